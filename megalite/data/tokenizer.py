"""SentencePiece tokenizer: a thin wrapper for training and a trainer tuned for exact round trips.

``train_tokenizer`` builds a BPE model that gives back the exact input text, which matters for
code: no Unicode normalisation (``identity``), whitespace runs kept, no dummy leading space,
whitespace-only pieces allowed (indentation), newline and tab as single pieces (the trainer
reads its input line by line, so it never sees them otherwise), and byte fallback so any
character outside the vocabulary still encodes as its UTF-8 bytes. One known limit of
SentencePiece remains: a literal U+2581 (the "▁" it uses for spaces) decodes as a space.

CLI::

    python -m megalite.data.tokenizer --input a.txt b.txt --model-prefix out/tok --vocab-size 1000
"""

import argparse
import hashlib
import math
import os
import random
import sys
import time
from collections.abc import Iterable, Sequence

import sentencepiece as spm


class Tokenizer:
    """Encode/decode with a SentencePiece ``.model``; ``eod`` ends every document."""

    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise FileNotFoundError(
                f"tokenizer model {model_path!r} not found; pass --tokenizer-model PATH.model "
                f"or train one with: python -m megalite.data.tokenizer --input FILES --model-prefix PREFIX"
            )
        self.model_path = model_path
        self._sp = spm.SentencePieceProcessor(model_file=model_path)
        self.vocab_size = self._sp.get_piece_size()
        # Identifies the model (its serialized proto), stored in the .idx of the data it encodes.
        self.fingerprint = hashlib.sha256(self._sp.serialized_model_proto()).digest()[:16]
        self.eod = self._sp.eos_id()
        if self.eod < 0:
            raise ValueError(
                f"tokenizer model {model_path!r} has no end-of-sentence piece (eos_id=-1), which marks "
                f"document ends; retrain it with megalite.data.tokenizer (eos id 2)"
            )

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
        """Encode many texts in one native call (``num_threads`` inside SentencePiece; -1: all cores)."""
        return self._sp.encode(list(texts), out_type=int, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


def train_tokenizer(
    input_files: Sequence[str],
    model_prefix: str,
    vocab_size: int,
    *,
    model_type: str = "bpe",
    character_coverage: float = 0.9995,
    input_sentence_size: int = 0,
    num_threads: int = 2,
    quiet: bool = True,
) -> str:
    """Train a SentencePiece model on text files (one sentence per line); returns ``PREFIX.model``.

    ``input_sentence_size`` > 0 trains on that many lines drawn uniformly (``sample_lines``: one
    pass, only the sample held in memory); 0 uses all. Ids 0-3 are unk, bos, eos (the EOD token), pad.
    """
    if not input_files:
        raise ValueError("train_tokenizer needs at least one input file (--input FILE ...)")
    for path in input_files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer training input {path!r} does not exist; check --input")
    parent = os.path.dirname(model_prefix)
    if parent:
        os.makedirs(parent, exist_ok=True)
    source = (
        {"sentence_iterator": iter(sample_lines(input_files, input_sentence_size))}
        if input_sentence_size > 0
        else {"input": list(input_files)}
    )
    spm.SentencePieceTrainer.train(
        **source,
        model_prefix=model_prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        byte_fallback=True,
        user_defined_symbols=["\n", "\t"],
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        num_threads=num_threads,
        minloglevel=2 if quiet else 0,
    )
    return model_prefix + ".model"


def sample_lines(input_files: Sequence[str], k: int, seed: int = 0) -> list[str]:
    """``k`` lines drawn uniformly without replacement from all of ``input_files`` (.gz/.zst read too),
    in one pass holding only the sample (reservoir sampling, Li's algorithm L: random numbers are
    drawn per kept line, not per line read). Deterministic for a ``seed``; non-UTF-8 bytes become U+FFFD."""
    from .readers import _decompressed

    rng = random.Random(seed)

    def log_u() -> float:  # log of a uniform draw in (0, 1)
        return math.log(rng.random() or 0.5)

    sample: list[str] = []
    w = math.exp(log_u() / k)
    skip = 0  # lines to pass over before the next one that replaces a sampled line
    for path in input_files:
        with open(path, "rb") as disk, _decompressed(path, disk) as f:
            for line in f:
                if len(sample) < k:
                    sample.append(line.rstrip(b"\n").decode("utf-8", errors="replace"))
                    if len(sample) == k:
                        skip = int(log_u() / math.log(1 - w))
                elif skip:
                    skip -= 1
                else:
                    sample[rng.randrange(k)] = line.rstrip(b"\n").decode("utf-8", errors="replace")
                    w *= math.exp(log_u() / k)
                    skip = int(log_u() / math.log(1 - w))
    return sample


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m megalite.data.tokenizer",
        description="Train a SentencePiece BPE tokenizer that round-trips code exactly.",
    )
    p.add_argument("--input", nargs="+", required=True, help="text files, one sentence per line")
    p.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    p.add_argument(
        "--character-coverage",
        type=float,
        default=0.9995,
        help="share of characters given their own piece; the rest use byte fallback",
    )
    p.add_argument(
        "--input-sentence-size", type=int, default=0, help="train on this many lines sampled uniformly (0: all)"
    )
    p.add_argument("--num-threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    start = time.perf_counter()
    path = train_tokenizer(
        args.input,
        args.model_prefix,
        args.vocab_size,
        model_type=args.model_type,
        character_coverage=args.character_coverage,
        input_sentence_size=args.input_sentence_size,
        num_threads=args.num_threads,
    )
    tok = Tokenizer(path)
    print(f"wrote {path} (vocab {tok.vocab_size}, eod id {tok.eod}) in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
