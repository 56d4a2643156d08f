"""Tokenize text into a PREFIX.bin/.idx dataset, with the EOD token after every document.

Inputs by name (see ``readers``): ``.txt`` (the whole file is one document; ``--split-paragraphs``
makes each blank-line-separated paragraph one), ``.jsonl``/``.json`` (one JSON object per line, the
document is the ``--json-keys`` fields joined by a blank line), either of them ``.gz``/``.zst``
compressed, and ``.parquet`` (the ``--json-keys`` columns). Documents with no text are skipped
and counted; an invalid JSON line is an error naming file and line unless ``--skip-bad-lines``
(then counted); bytes that are not UTF-8 become U+FFFD (counted).

``--workers N`` tokenizes in N processes (one SentencePiece thread each). The main process reads
and cuts the input into chunks that do not depend on N, and writes the results in input order:
the output is byte-identical for every N. ``--append`` adds to an existing dataset; like a new
one it is written under temporary names and renamed into place, so a failure leaves the old
dataset as it was.

CLI::

    python -m megalite.data.preprocess --input a.txt b.jsonl.gz --tokenizer-model tok.model \
        --output-prefix data/corpus --workers 8
"""

import argparse
import collections
import itertools
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from .indexed import IndexedDatasetBuilder, token_dtype
from .progress import Progress
from .readers import Chunk, Counts, chunks, kind_of, texts_of
from .tokenizer import Tokenizer

_BATCH = 256  # documents per native encode call (write_dataset)
_worker: dict = {}  # the tokenizer and options of this worker process


def _init_worker(model: str, json_keys: Sequence[str], split_paragraphs: bool, skip_bad: bool) -> None:
    # A failure here is kept for the first chunk to raise: a Pool initializer that raises makes the
    # Pool start a new worker, forever.
    try:
        _worker.update(tok=Tokenizer(model), keys=tuple(json_keys), split=split_paragraphs, skip=skip_bad)
    except Exception as exc:
        _worker["error"] = exc


def _encode(chunk: Chunk) -> tuple[np.ndarray, np.ndarray, Counts]:
    """(tokens, sizes, counts) of one chunk, EOD after each document."""
    w = _worker
    if "error" in w:
        raise w["error"]
    texts, counts = texts_of(chunk, w["keys"], w["split"], w["skip"])
    tok = w["tok"]
    ids = tok.encode_batch(texts, num_threads=1) if texts else []
    sizes = np.fromiter((len(x) + 1 for x in ids), dtype=np.int32, count=len(ids))
    flat = np.fromiter(
        itertools.chain.from_iterable(x + [tok.eod] for x in ids), dtype=token_dtype(tok.vocab_size), count=sizes.sum()
    )
    return flat, sizes, counts


def _in_order(work: Iterable[Chunk], workers: int, init_args: tuple):
    """(chunk, result) in input order; at most 2 x workers chunks in flight, so memory stays bounded."""
    if workers == 1:
        _init_worker(*init_args)
        for chunk in work:
            yield chunk, _encode(chunk)
        return
    with multiprocessing.get_context("spawn").Pool(workers, _init_worker, init_args) as pool:
        pending = collections.deque()
        for chunk in work:
            pending.append((chunk, pool.apply_async(_encode, (chunk,))))
            if len(pending) >= 2 * workers:
                done, res = pending.popleft()
                yield done, res.get()
        while pending:
            done, res = pending.popleft()
            yield done, res.get()


def preprocess(
    input_files: Sequence[str],
    tokenizer_model: str,
    output_prefix: str,
    *,
    json_keys: Sequence[str] = ("text",),
    split_paragraphs: bool = False,
    workers: int = 1,
    append: bool = False,
    skip_bad_lines: bool = False,
    log: Callable[[str], None] = print,
    progress: Progress | None = None,
) -> dict:
    """Tokenize ``input_files`` into ``output_prefix``.bin/.idx; returns counts for logging."""
    if not input_files:
        raise ValueError("preprocess needs at least one input file (--input FILE ...)")
    if workers < 1:
        raise ValueError(f"--workers must be >= 1 (got {workers})")
    for path in input_files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"input {path!r} does not exist; check --input")
        kind_of(path)  # raises naming the supported extensions
    tok = Tokenizer(tokenizer_model)
    start = time.perf_counter()
    total_bytes = sum(os.path.getsize(p) for p in input_files)
    tokens, counts = 0, Counts()

    work = (chunk for path in input_files for chunk in chunks(path, json_keys))
    init = (tokenizer_model, tuple(json_keys), split_paragraphs, skip_bad_lines)
    offsets = dict(zip(input_files, itertools.accumulate([0, *map(os.path.getsize, input_files)])))
    with IndexedDatasetBuilder(output_prefix, tok.vocab_size, tok.fingerprint, append=append) as builder:
        kept = builder.num_documents
        for chunk, (flat, sizes, got) in _in_order(work, workers, init):
            builder.add_documents(flat, sizes)
            counts.add(got)
            tokens += len(flat)
            if progress:
                progress.update(counts.documents, tokens, offsets[chunk.path] + chunk.nbytes)
        if progress:
            progress.update(counts.documents, tokens, total_bytes, force=True)
            progress.close()
        builder.finalize()
    stats = {
        "documents": counts.documents,
        "tokens": tokens,
        "empty_skipped": counts.empty,
        "bad_lines_skipped": counts.bad_lines,
        "utf8_replaced": counts.replaced,
        "input_bytes": total_bytes,
        "seconds": time.perf_counter() - start,
        "bin": output_prefix + ".bin",
        "idx": output_prefix + ".idx",
    }
    log(
        f"wrote {stats['bin']} and .idx: {counts.documents} documents, {tokens} tokens (EOD included) in "
        f"{stats['seconds']:.1f}s"
        + (f", appended to {kept} documents already there" if append else "")
        + f"; skipped {counts.empty} empty documents"
        + (f" and {counts.bad_lines} bad lines" if skip_bad_lines else "")
        + (f"; {counts.replaced} documents had invalid UTF-8 (replaced by U+FFFD)" if counts.replaced else "")
    )
    return stats


def write_dataset(texts: Iterable[str], tok: Tokenizer, output_prefix: str) -> tuple[int, int]:
    """Encode ``texts`` (one document each) + EOD into ``output_prefix``.bin/.idx; (documents, tokens)."""
    docs = tokens = 0
    texts = iter(texts)
    with IndexedDatasetBuilder(output_prefix, tok.vocab_size, tok.fingerprint) as builder:
        while batch := list(itertools.islice(texts, _BATCH)):
            for ids in tok.encode_batch(batch):
                ids.append(tok.eod)
                builder.add_document(ids)
                docs, tokens = docs + 1, tokens + len(ids)
        builder.finalize()
    return docs, tokens


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m megalite.data.preprocess",
        description="Tokenize text, JSON lines or parquet files into a megalite .bin/.idx dataset.",
    )
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        help=".txt, .jsonl or .json (JSON lines), each optionally .gz/.zst, or .parquet files",
    )
    p.add_argument("--tokenizer-model", required=True, help="SentencePiece .model")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument(
        "--json-keys", nargs="+", default=["text"], help="JSON field(s) / parquet column(s) holding the text"
    )
    p.add_argument(
        "--split-paragraphs",
        action="store_true",
        help=".txt: one document per blank-line-separated paragraph instead of per file",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
        help="tokenizer processes (default: the CPUs this process may use); the output is the same for any N",
    )
    p.add_argument("--append", action="store_true", help="add the documents to an existing PREFIX dataset")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip (and count) invalid JSON lines")
    p.add_argument(
        "--log-interval", type=float, default=30.0, help="seconds between progress lines when not on a terminal"
    )
    args = p.parse_args(argv)
    preprocess(
        args.input,
        args.tokenizer_model,
        args.output_prefix,
        json_keys=args.json_keys,
        split_paragraphs=args.split_paragraphs,
        workers=args.workers,
        append=args.append,
        skip_bad_lines=args.skip_bad_lines,
        progress=Progress(
            sum(os.path.getsize(f) for f in args.input if os.path.isfile(f)), log_interval=args.log_interval
        ),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
