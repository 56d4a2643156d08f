"""Input files of ``preprocess`` cut into chunks of raw records, and the turning of a chunk into texts.

The main process only reads and cuts (``chunks``); decoding, JSON parsing and tokenizing happen in
the workers (``texts_of``), so they scale with ``--workers``. Chunks depend on the input alone,
never on the worker count, and come back in order: the output is the same for any ``--workers``.

Formats by name: ``.txt`` (the file is one document, or one per blank-line-separated paragraph),
``.jsonl``/``.json`` JSON lines, either of them gzip- (``.gz``) or zstd- (``.zst``) compressed,
and ``.parquet`` (the ``--json-keys`` columns). Bytes that are not UTF-8 become U+FFFD (the
Unicode replacement character) and the document is counted; a text with lone surrogates (from
JSON escapes) gets "?" for them, counted the same way.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

CHUNK_LINES = 1024  # JSON lines (or parquet rows) per chunk
_TEXT, _JSON, _PARQUET = "txt", "jsonl", "parquet"


@dataclass
class Chunk:
    path: str
    kind: str
    first_line: int  # 1-based line (row) number of records[0]
    records: list  # raw bytes lines (jsonl), one raw bytes file (txt), or per-row text lists (parquet)
    nbytes: int = 0  # input bytes on disk this chunk finishes (for progress)


@dataclass
class Counts:
    documents: int = 0
    empty: int = 0  # documents with no text (or only whitespace), skipped
    bad_lines: int = 0  # skipped for --skip-bad-lines
    replaced: int = 0  # documents with invalid UTF-8 (or lone surrogates) replaced

    def add(self, other: Counts) -> None:
        self.documents += other.documents
        self.empty += other.empty
        self.bad_lines += other.bad_lines
        self.replaced += other.replaced


def kind_of(path: str) -> str:
    """The input kind of ``path`` from its name, or a ValueError naming the supported ones."""
    name = path.lower().removesuffix(".gz").removesuffix(".zst")
    if name.endswith(".txt"):
        return _TEXT
    if name.endswith((".jsonl", ".json")):
        return _JSON
    if path.lower().endswith(".parquet"):
        return _PARQUET
    raise ValueError(
        f"input {path} has unsupported extension; use .txt, .jsonl or .json (JSON lines), optionally "
        ".gz or .zst compressed, or .parquet"
    )


def _decompressed(path: str, disk):
    """A reader of the bytes of ``path`` (open as ``disk``), decompressed by its suffix; reading it
    moves ``disk.tell()``, which progress reports use."""
    name = path.lower()
    if name.endswith(".gz"):
        return gzip.GzipFile(fileobj=disk, mode="rb")
    if not name.endswith(".zst"):
        return disk
    try:
        import zstandard
    except ImportError:
        try:
            from compression import zstd  # Python 3.14+
        except ImportError:
            raise ValueError(
                f"reading {path} needs zstd support: pip install zstandard (or use Python 3.14+, "
                "which has compression.zstd), or decompress it first"
            ) from None
        return zstd.ZstdFile(disk, "rb")
    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(disk, closefd=False))


def chunks(path: str, json_keys: Sequence[str]) -> Iterator[Chunk]:
    """The chunks of one input file; each says how far into the file (bytes on disk) it ends."""
    kind, size = kind_of(path), os.path.getsize(path)
    if kind == _PARQUET:
        yield from _parquet_chunks(path, json_keys, size)
        return
    with open(path, "rb") as disk, _decompressed(path, disk) as f:
        if kind == _TEXT:
            yield Chunk(path, kind, 1, [f.read()], size)
            return
        line_no, batch = 1, []
        for line in f:
            batch.append(line)
            if len(batch) == CHUNK_LINES:
                yield Chunk(path, kind, line_no, batch, disk.tell())
                line_no, batch = line_no + len(batch), []
        if batch:
            yield Chunk(path, kind, line_no, batch, size)


def _parquet_chunks(path: str, columns: Sequence[str], size: int) -> Iterator[Chunk]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(
            f"reading {path} needs pyarrow: pip install 'megalite[parquet]' (or pip install pyarrow)"
        ) from None
    pf = pq.ParquetFile(path)
    missing = [c for c in columns if c not in pf.schema_arrow.names]
    if missing:
        raise ValueError(
            f"{path}: no column {missing[0]!r} (columns: {', '.join(pf.schema_arrow.names)}); "
            "choose the text column with --json-keys"
        )
    rows, total = 1, max(1, pf.metadata.num_rows)
    for batch in pf.iter_batches(batch_size=CHUNK_LINES, columns=list(columns)):
        cols = [batch.column(c).to_pylist() for c in columns]
        yield Chunk(path, _PARQUET, rows, list(zip(*cols)), size * (rows - 1 + batch.num_rows) // total)
        rows += batch.num_rows


def _decode(raw: bytes, counts: Counts) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        counts.replaced += 1
        return raw.decode("utf-8", errors="replace")


def _clean(text: str, counts: Counts) -> str:
    """``text`` as valid Unicode: lone surrogates (JSON "\\ud800") cannot be encoded, so they become "?"."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        counts.replaced += 1
        return text.encode("utf-8", errors="replace").decode("utf-8")


def texts_of(chunk: Chunk, json_keys: Sequence[str], split_paragraphs: bool, skip_bad: bool) -> tuple[list, Counts]:
    """The documents of ``chunk`` (empty ones dropped) and what was counted on the way."""
    counts, out = Counts(), []
    if chunk.kind == _TEXT:
        text = _decode(chunk.records[0], counts)
        docs = [p.strip("\r\n") for p in re.split(r"\r?\n[ \t]*\r?\n", text)] if split_paragraphs else [text]
    elif chunk.kind == _PARQUET:
        docs = []
        for n, row in enumerate(chunk.records, chunk.first_line):
            bad = next(
                (f"column {k!r} is {type(v).__name__}" for k, v in zip(json_keys, row) if not isinstance(v, str)), None
            )
            if bad and skip_bad:
                counts.bad_lines += 1
                continue
            if bad:
                raise ValueError(f"{chunk.path}: row {n}: {bad}, not a string; or pass --skip-bad-lines")
            docs.append(_clean("\n\n".join(row), counts))
    else:
        docs = []
        for n, raw in enumerate(chunk.records, chunk.first_line):
            if not raw.strip():
                continue
            try:
                docs.append(_clean(_json_text(_decode(raw, counts), json_keys, chunk.path, n), counts))
            except ValueError:
                if not skip_bad:
                    raise
                counts.bad_lines += 1
    for text in docs:
        if text.strip():
            out.append(text)
        else:
            counts.empty += 1
    counts.documents = len(out)
    return out, counts


def _json_text(line: str, keys: Sequence[str], path: str, line_no: int) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path}:{line_no}: not a JSON object per line ({e.msg}); fix the line or pass --skip-bad-lines"
        ) from None
    for key in keys:
        if not isinstance(record, dict) or key not in record:
            raise ValueError(
                f"{path}:{line_no}: no field {key!r}; choose the text field with --json-keys (or --skip-bad-lines)"
            )
        if not isinstance(record[key], str):
            raise ValueError(f"{path}:{line_no}: field {key!r} is {type(record[key]).__name__}, not a string")
    return "\n\n".join(record[key] for key in keys)
