"""Tokenize text into a PREFIX.bin/.idx dataset, with the EOD token after every document.

Inputs by extension:
  ``.txt``            the whole file is one document; ``--split-paragraphs`` makes each
                      blank-line-separated paragraph a document instead
  ``.jsonl``/``.json`` one JSON object per line; the document is the ``--json-keys`` field
                      (several keys are joined with a blank line, in the order given)

CLI::

    python -m megalite.data.preprocess --input a.txt b.jsonl --tokenizer-model tok.model --output-prefix data/corpus
"""

import argparse
import itertools
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

from .indexed import IndexedDatasetBuilder
from .tokenizer import Tokenizer

_BATCH = 256  # documents per native encode call
_EXTS = (".txt", ".jsonl", ".json")


def iter_documents(path: str, *, json_keys: Sequence[str] = ("text",), split_paragraphs: bool = False) -> Iterator[str]:
    """Yield the documents of one input file (see the module docstring for the rules)."""
    try:
        yield from _documents(path, os.path.splitext(path)[1].lower(), json_keys, split_paragraphs)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8") from None


def _documents(path: str, ext: str, json_keys: Sequence[str], split_paragraphs: bool) -> Iterator[str]:
    if ext == ".txt":
        with open(path, encoding="utf-8", newline="") as f:  # keep \r\n as written
            text = f.read()
        if not split_paragraphs:
            yield text
            return
        for para in re.split(r"\r?\n[ \t]*\r?\n", text):
            if para.strip():
                yield para.strip("\r\n")
    elif ext in _EXTS:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: not a JSON object per line ({e.msg})") from None
                yield "\n\n".join(_field(record, key, path, line_no) for key in json_keys)
    else:
        raise ValueError(f"input {path} has unsupported extension {ext!r}; use .txt, .jsonl or .json (JSON lines)")


def _field(record, key: str, path: str, line_no: int) -> str:
    if not isinstance(record, dict) or key not in record:
        raise ValueError(f"{path}:{line_no}: no field {key!r}; choose the text field with --json-keys")
    if not isinstance(record[key], str):
        raise ValueError(f"{path}:{line_no}: field {key!r} is {type(record[key]).__name__}, not a string")
    return record[key]


def preprocess(
    input_files: Sequence[str],
    tokenizer_model: str,
    output_prefix: str,
    *,
    json_keys: Sequence[str] = ("text",),
    split_paragraphs: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Tokenize ``input_files`` into ``output_prefix``.bin/.idx; returns counts for logging."""
    if not input_files:
        raise ValueError("preprocess needs at least one input file (--input FILE ...)")
    for path in input_files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"input {path!r} does not exist; check --input")
        if os.path.splitext(path)[1].lower() not in _EXTS:
            raise ValueError(f"input {path} has unsupported extension; use .txt, .jsonl or .json (JSON lines)")
    tok = Tokenizer(tokenizer_model)
    start = time.perf_counter()
    texts = (
        t for path in input_files for t in iter_documents(path, json_keys=json_keys, split_paragraphs=split_paragraphs)
    )
    docs, tokens = write_dataset(texts, tok, output_prefix)
    stats = {
        "documents": docs,
        "tokens": tokens,
        "seconds": time.perf_counter() - start,
        "bin": output_prefix + ".bin",
        "idx": output_prefix + ".idx",
    }
    log(f"wrote {stats['bin']} and .idx: {docs} documents, {tokens} tokens (EOD included) in {stats['seconds']:.1f}s")
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
        description="Tokenize .txt/.jsonl files into a megalite .bin/.idx dataset.",
    )
    p.add_argument("--input", nargs="+", required=True, help=".txt, .jsonl or .json (JSON lines) files")
    p.add_argument("--tokenizer-model", required=True, help="SentencePiece .model")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="JSON field(s) holding the text")
    p.add_argument(
        "--split-paragraphs",
        action="store_true",
        help=".txt: one document per blank-line-separated paragraph instead of per file",
    )
    args = p.parse_args(argv)
    preprocess(
        args.input,
        args.tokenizer_model,
        args.output_prefix,
        json_keys=args.json_keys,
        split_paragraphs=args.split_paragraphs,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
