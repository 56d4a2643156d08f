"""Preprocessing at scale: workers, input formats, bad input, --append, progress."""

import filecmp
import gzip
import io
import json
import os

import pytest

from megalite.data import readers
from megalite.data.indexed import DatasetFormatError, IndexedDataset
from megalite.data.preprocess import main as preprocess_main
from megalite.data.preprocess import preprocess
from megalite.data.progress import Progress
from megalite.data.tokenizer import Tokenizer, train_tokenizer


@pytest.fixture
def mixed(tmp_path, monkeypatch):
    """Mixed inputs with empty documents, an invalid JSON line, non-UTF-8 bytes and a lone
    surrogate; chunks of 2 lines, so several chunks are in flight at once."""
    monkeypatch.setattr(readers, "CHUNK_LINES", 2)
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 au lait\n\nsecond paragraph\n")
    (tmp_path / "empty.txt").write_bytes(b"  \n")
    lines = [
        json.dumps({"text": "one"}).encode(),
        b"",  # blank line: not a document, not counted
        json.dumps({"text": ""}).encode(),  # empty document
        b'{"text": "two \xff\xfe bytes"}',  # invalid UTF-8 inside a string
        b'{"text": "broken',  # invalid JSON: line 5
        json.dumps({"text": "lone \ud800 surrogate"}).encode(),
        json.dumps({"text": "three"}).encode(),
    ]
    (tmp_path / "b.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with gzip.open(tmp_path / "c.jsonl.gz", "wb") as f:
        f.write(b"".join(json.dumps({"text": f"gz {i}", "t": "x"}).encode() + b"\n" for i in range(7)))
    return [str(tmp_path / n) for n in ("a.txt", "empty.txt", "b.jsonl", "c.jsonl.gz")]


def decoded(prefix, tok):
    ds = IndexedDataset(prefix)
    assert all(ds.doc(i)[-1] == tok.eod for i in range(len(ds)))
    return [tok.decode(ds.doc(i)[:-1]) for i in range(len(ds))]


def test_workers_give_identical_output_and_count_bad_input(tmp_path, corpus, mixed):
    model = corpus[3]
    tok = Tokenizer(model)
    stats = {}
    for n in (1, 3):
        stats[n] = preprocess(
            mixed, model, str(tmp_path / f"w{n}"), workers=n, skip_bad_lines=True, log=lambda *a: None
        )
    for ext in (".bin", ".idx"):
        assert filecmp.cmp(tmp_path / f"w1{ext}", tmp_path / f"w3{ext}", shallow=False)
    assert {k: stats[1][k] for k in ("documents", "empty_skipped", "bad_lines_skipped", "utf8_replaced")} == {
        "documents": 12,
        "empty_skipped": 2,
        "bad_lines_skipped": 1,
        "utf8_replaced": 3,
    }
    assert stats[3]["tokens"] == stats[1]["tokens"]
    docs = decoded(str(tmp_path / "w1"), tok)
    assert docs[:5] == [
        "caf\ufffd au lait\n\nsecond paragraph\n",
        "one",
        "two \ufffd\ufffd bytes",
        "lone ? surrogate",
        "three",
    ]
    assert docs[5:] == [f"gz {i}" for i in range(7)]

    # without --skip-bad-lines: an error naming file and line, and nothing written
    for n in (1, 3):
        with pytest.raises(ValueError, match=r"b\.jsonl:5: not a JSON object per line .*--skip-bad-lines"):
            preprocess(mixed, model, str(tmp_path / "bad" / "x"), workers=n, log=lambda *a: None)
    assert os.listdir(tmp_path / "bad") == []


def test_split_paragraphs_and_json_keys(tmp_path, corpus, mixed):
    model = corpus[3]
    out = str(tmp_path / "p")
    preprocess([mixed[0], mixed[3]], model, out, split_paragraphs=True, json_keys=["t", "text"], log=lambda *a: None)
    assert decoded(out, Tokenizer(model)) == ["caf\ufffd au lait", "second paragraph"] + [
        f"x\n\ngz {i}" for i in range(7)
    ]


def test_append_is_all_or_nothing(tmp_path, corpus, mixed):
    model = corpus[3]
    whole, part = str(tmp_path / "whole"), str(tmp_path / "part")
    preprocess([mixed[0], mixed[3]], model, whole, log=lambda *a: None)
    preprocess([mixed[0]], model, part, log=lambda *a: None)
    preprocess([mixed[3]], model, part, append=True, workers=2, log=lambda *a: None)
    for ext in (".bin", ".idx"):
        assert filecmp.cmp(whole + ext, part + ext, shallow=False)
    before = {ext: open(part + ext, "rb").read() for ext in (".bin", ".idx")}
    with pytest.raises(ValueError, match=r"b\.jsonl:5"):  # fails midway: the dataset is as it was
        preprocess([mixed[3], mixed[2]], model, part, append=True, log=lambda *a: None)
    assert {ext: open(part + ext, "rb").read() for ext in (".bin", ".idx")} == before
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]  # no temporaries left
    text = tmp_path / "other.txt"
    text.write_text("another tokenizer's training text\n" * 50)
    other = train_tokenizer([str(text)], str(tmp_path / "other"), 300)
    with pytest.raises(DatasetFormatError, match="--append: .*written by another tokenizer"):
        preprocess([mixed[0]], other, part, append=True, log=lambda *a: None)


def _write_zst(path, records):
    import zstandard

    path.write_bytes(zstandard.ZstdCompressor().compress(b"".join(json.dumps(r).encode() + b"\n" for r in records)))


def _write_parquet(path, records):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [r["text"] for r in records]}), str(path), row_group_size=3)


@pytest.mark.parametrize(
    "name, module, write, missing",
    [
        ("d.jsonl.zst", "zstandard", _write_zst, "needs zstd support"),
        ("d.parquet", "pyarrow", _write_parquet, "needs pyarrow"),
    ],
)
def test_optional_formats(tmp_path, corpus, monkeypatch, name, module, write, missing):
    """Read when their package is installed (not on the CI install), else a clear error."""
    model = corpus[3]
    try:
        __import__(module)
    except ImportError:
        (tmp_path / name).write_bytes(b"\0")
        with pytest.raises(ValueError, match=missing):
            preprocess([str(tmp_path / name)], model, str(tmp_path / "z"), log=lambda *a: None)
        return
    monkeypatch.setattr(readers, "CHUNK_LINES", 2)
    write(tmp_path / name, [{"text": f"doc {i}"} for i in range(7)] + [{"text": ""}])
    stats = preprocess([str(tmp_path / name)], model, str(tmp_path / "z"), workers=2, log=lambda *a: None)
    assert decoded(str(tmp_path / "z"), Tokenizer(model)) == [f"doc {i}" for i in range(7)]
    assert stats["empty_skipped"] == 1


def test_unsupported_extension(tmp_path, corpus):
    (tmp_path / "e.csv").write_text("x")
    with pytest.raises(ValueError, match="unsupported extension.*gz or .zst compressed, or .parquet"):
        preprocess_main(["--input", str(tmp_path / "e.csv"), "--tokenizer-model", corpus[3], "--output-prefix", "x"])


def test_progress_lines():
    log = io.StringIO()
    p = Progress(1000, stream=log, log_interval=0)
    p.update(10, 500, 250)
    p.close()
    line = log.getvalue()
    assert line.startswith("preprocess:  25.0% 10 docs,") and "tokens/s" in line and "MB/s" in line and "ETA" in line
    assert line.count("\n") == 1 and "\r" not in line

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    p = Progress(1000, stream=tty)
    p.update(10, 500, 1000, force=True)
    p.close()
    assert tty.getvalue().startswith("\rpreprocess: [########################] 100.0%") and tty.getvalue().endswith(
        "\n"
    )
