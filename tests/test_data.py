import json
import os
import pathlib
import pickle
import re
import sysconfig
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megalite.data import default_corpus, indexed
from megalite.data.default_corpus import ensure_default_corpus
from megalite.data.gpt_dataset import GPTDataset, build_datasets, split_bounds
from megalite.data.indexed import DatasetFormatError, IndexedDataset, IndexedDatasetBuilder
from megalite.data.preprocess import main as preprocess_main
from megalite.data.preprocess import preprocess
from megalite.data.tokenizer import Tokenizer, train_tokenizer

EOD = 0


def write(prefix, docs, vocab_size=100):
    builder = IndexedDatasetBuilder(str(prefix), vocab_size)
    for d in docs:
        builder.add_document(d)
    builder.finalize()
    return str(prefix)


def rebuild(prefix, tokenizer=r"\S+"):
    """The preprocess command an error must give to rebuild the dataset at ``prefix``."""
    return (
        r"python -m megalite\.data\.preprocess --input FILES --tokenizer-model "
        + tokenizer
        + " --output-prefix "
        + re.escape(str(prefix))
    )


def tiny_docs(n, seed=0):
    """n documents of 1-7 tokens ids 1..99, each ending with EOD."""
    rng = np.random.default_rng(seed)
    return [list(rng.integers(1, 100, rng.integers(0, 7))) + [EOD] for _ in range(n)]


# ---- .bin/.idx format -------------------------------------------------------------------------


@pytest.mark.parametrize("vocab_size, dtype", [(65536, np.uint16), (70000, np.int32)])
def test_build_and_read(tmp_path, vocab_size, dtype):
    docs = [[1, 2, 3], [65535], [], [7, 8]]
    ds = IndexedDataset(write(tmp_path / "sub" / "d", docs, vocab_size))
    assert (len(ds), ds.num_tokens, ds.vocab_size, ds.dtype) == (4, 6, vocab_size, np.dtype(dtype))
    assert [ds.doc(i).tolist() for i in range(4)] == docs
    assert os.path.getsize(tmp_path / "sub" / "d.bin") == 6 * np.dtype(dtype).itemsize
    assert sorted(os.listdir(tmp_path / "sub")) == ["d.bin", "d.idx"]  # no temp files left
    assert len(pickle.dumps(ds)) < 200  # pickled by prefix (DataLoader workers), not by content
    assert pickle.loads(pickle.dumps(ds)).doc(3).tolist() == [7, 8]


def test_builder_rejects_bad_ids_and_cleans_up(tmp_path):
    with pytest.raises(ValueError, match=r"outside \[0, 10\)"):
        with IndexedDatasetBuilder(str(tmp_path / "d"), 10) as b:
            b.add_document([1, 2])
            b.add_document([3, 10])
    assert os.listdir(tmp_path) == []
    with pytest.raises(DatasetFormatError, match="no documents"):
        IndexedDatasetBuilder(str(tmp_path / "d"), 10).finalize()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("ext", [".bin", ".idx"])
def test_missing_file_is_named(tmp_path, ext):
    prefix = write(tmp_path / "d", [[1, 2]])
    os.remove(prefix + ext)
    with pytest.raises(DatasetFormatError, match=f"d{ext} is missing.*preprocess"):
        IndexedDataset(prefix)


@pytest.mark.fault("bad-data")
def test_truncated_bin(tmp_path):
    prefix = write(tmp_path / "d", [[1, 2, 3], [4, 5]])
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(6)
    with pytest.raises(
        DatasetFormatError, match=r"d\.bin is 6 bytes .* 5 uint16 tokens .*truncated.*" + rebuild(prefix)
    ):
        IndexedDataset(prefix)


def _patch_idx(prefix, offset, data):
    with open(prefix + ".idx", "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_empty_dataset(tmp_path):
    prefix = str(tmp_path / "d")
    with open(prefix + ".idx", "wb") as f:
        f.write(indexed.HEADERS[indexed.VERSION].pack(indexed.MAGIC, indexed.VERSION, 1, 100, 0, 0, bytes(16)))
    open(prefix + ".bin", "wb").close()
    with pytest.raises(DatasetFormatError, match="is empty"):
        IndexedDataset(prefix)


HEADER = indexed.HEADERS[indexed.VERSION].size


@pytest.mark.fault("bad-data")
@pytest.mark.parametrize(
    "offset, data, match",
    [
        (0, b"NOTMEGA\0", "not a megalite index"),
        (8, np.uint64(7).tobytes(), "format version 7"),
        (16, np.uint64(9).tobytes(), "dtype code 9"),
        (32, np.uint64(3).tobytes(), r"d\.idx is 88 bytes, its header implies 100: truncated or corrupt"),  # doc count
        (HEADER + 8, np.int64(2).tobytes(), "do not tile"),  # second document's offset out of place
        (HEADER + 16 + 4, np.int32(-1).tobytes(), "do not tile"),  # negative size
    ],
)
def test_corrupt_idx(tmp_path, offset, data, match):
    prefix = write(tmp_path / "d", [[1, 2, 3], [4, 5]])
    _patch_idx(prefix, offset, data)
    with pytest.raises(DatasetFormatError, match=match + ".*" + rebuild(prefix)):
        IndexedDataset(prefix)


@pytest.mark.fault("bad-data")
def test_truncated_idx(tmp_path):
    prefix = write(tmp_path / "d", [[1, 2, 3], [4, 5]])
    for size, need in [(HEADER + 20, 88), (HEADER - 1, HEADER), (10, HEADER)]:  # shorter and shorter
        with open(prefix + ".idx", "r+b") as f:
            f.truncate(size)
        with pytest.raises(DatasetFormatError, match=rf"d\.idx .*{need}.*" + rebuild(prefix)):
            IndexedDataset(prefix)


def test_format_1_index_is_still_read(tmp_path):
    prefix = write(tmp_path / "d", [[1, 2, 3], [4, 5]])
    with open(prefix + ".idx", "rb") as f:
        raw = f.read()
    magic, _, *counts, _ = indexed.HEADERS[2].unpack_from(raw)
    with open(prefix + ".idx", "wb") as f:  # the same index as version 1 wrote it: no tokenizer fingerprint
        f.write(indexed.HEADERS[1].pack(magic, 1, *counts) + raw[indexed.HEADERS[2].size :])
    ds = IndexedDataset(prefix)
    assert [ds.doc(i).tolist() for i in range(2)] == [[1, 2, 3], [4, 5]] and ds.tokenizer_fingerprint is None


# ---- GPT samples --------------------------------------------------------------------------------


def reference_windows(ds, docs, n_samples, epochs):
    """The obvious construction: concatenate documents epoch by epoch, cut overlapping windows."""
    stream = np.concatenate([np.concatenate([docs[d] for d in ds.doc_order(e)]) for e in range(epochs)])
    s = ds.seq_length
    return [stream[k * s : k * s + s + 1] for k in range(n_samples)]


@pytest.mark.parametrize("seq_length", [1, 4, 13, 200])  # 200 spans several epochs of 98 tokens
def test_unshuffled_samples_match_reference(tmp_path, seq_length):
    docs = tiny_docs(25)
    ds = GPTDataset(IndexedDataset(write(tmp_path / "d", docs)), np.arange(25), seq_length, 1, EOD, shuffle=False)
    n = 3 * len(ds) + 2
    ref = reference_windows(ds, docs, n, epochs=n * seq_length // ds.num_tokens + 2)
    for i in range(n):
        np.testing.assert_array_equal(ds.window(i), ref[i])


def test_shuffled_samples_are_a_permutation_of_reference(tmp_path):
    docs = tiny_docs(40)
    prefix = write(tmp_path / "d", docs)
    ds = GPTDataset(IndexedDataset(prefix), np.arange(40), 8, 5, EOD)
    n = len(ds)
    assert not np.array_equal(ds.doc_order(0), ds.doc_order(1))  # each epoch its own shuffle
    ref = reference_windows(ds, docs, 3 * n, epochs=4)
    for block in range(3):  # each block of len(ds) samples is a shuffle of the next len(ds) windows
        got = sorted(tuple(ds.window(block * n + j)) for j in range(n))
        assert got == sorted(tuple(w) for w in ref[block * n : (block + 1) * n])
    assert [ds.window(j).tolist() for j in range(n)] != [w.tolist() for w in ref[:n]]


def test_order_is_a_pure_function_of_seed_and_index(tmp_path):
    prefix = write(tmp_path / "d", tiny_docs(40))
    make = lambda seed: GPTDataset(IndexedDataset(prefix), np.arange(40), 8, seed, EOD)  # noqa: E731
    a, b, c = make(5), make(5), make(6)
    idx = [0, 3, 1000, 17, 2, 999_999, 3]
    # Random access in another order on a fresh object (a resumed run) gives the same samples.
    seq = [a.window(i).tolist() for i in idx]
    assert [b.window(i).tolist() for i in reversed(idx)] == seq[::-1]
    assert [c.window(i).tolist() for i in idx] != seq


def test_sample_tensors(tmp_path):
    docs = tiny_docs(30)
    ds = GPTDataset(IndexedDataset(write(tmp_path / "d", docs)), np.arange(30), 16, 1, EOD)
    s = ds[7]
    assert set(s) == {"tokens", "labels", "loss_mask", "position_ids"}
    w = torch.from_numpy(ds.window(7))
    torch.testing.assert_close(s["tokens"], w[:-1])
    torch.testing.assert_close(s["labels"], w[1:])
    torch.testing.assert_close(s["tokens"][1:], s["labels"][:-1])
    assert s["tokens"].dtype == s["labels"].dtype == torch.int64 and s["tokens"].shape == (16,)
    torch.testing.assert_close(s["loss_mask"], torch.ones(16))
    torch.testing.assert_close(s["position_ids"], torch.arange(16))
    assert (s["tokens"] == EOD).any()  # packed across documents


def test_split_bounds():
    assert split_bounds(1000, "969,30,1") == [(0, 969), (969, 999), (999, 1000)]
    assert split_bounds(10, "8,2") == [(0, 8), (8, 10), (10, 10)]
    assert split_bounds(10, "1") == [(0, 10), (10, 10), (10, 10)]
    assert split_bounds(7, "1/1/1") == [(0, 2), (2, 5), (5, 7)]
    for bad in ["", "a,b", "1,2,3,4", "-1,2", "0,0,0"]:
        with pytest.raises(ValueError, match="--split"):
            split_bounds(10, bad)


def test_build_datasets_splits_and_errors(tmp_path):
    prefix = write(tmp_path / "d", tiny_docs(100))
    train, valid, test = build_datasets(prefix, "90,10,0", 8, 3, EOD)
    assert (train.num_documents, valid.num_documents, test.num_documents) == (90, 10, 0)
    assert set(train.doc_ids).isdisjoint(valid.doc_ids)
    assert train[0]["tokens"].shape == valid[5]["tokens"].shape == (8,)
    with pytest.raises(ValueError, match=r"test split of .*d \(0 of 100 documents, --split 90,10,0\) has no documents"):
        test[0]
    with pytest.raises(ValueError, match="vocabulary of 100 but the tokenizer has 50"):
        build_datasets(
            prefix, "1", 8, 3, EOD, tokenizer=SimpleNamespace(vocab_size=50, fingerprint=None, model_path="t.model")
        )
    with pytest.raises(ValueError, match="does not end with the EOD id 5.*" + rebuild(prefix)):
        build_datasets(prefix, "1", 8, 3, 5)


# ---- preprocess CLI and the default corpus ------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache") / "corpus")
    logs = []
    prefix, model = ensure_default_corpus(cache, logs.append, max_bytes=150_000, vocab_size=500)
    return cache, prefix, model, logs


def test_preprocess_txt_and_jsonl(tmp_path, corpus):
    _, _, model, _ = corpus
    tok = Tokenizer(model)
    a = "def f():\r\n    return 1  \r\n\r\n\nclass Ü: pass\n"
    (tmp_path / "a.txt").write_bytes(a.encode())
    records = [{"text": "first doc ∑", "meta": 1}, {"text": "", "title": "t"}, {"text": "third\n\tdoc"}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    out = str(tmp_path / "out" / "ds")
    assert (
        preprocess_main(
            [
                "--input",
                str(tmp_path / "a.txt"),
                str(tmp_path / "b.jsonl"),
                "--tokenizer-model",
                model,
                "--output-prefix",
                out,
            ]
        )
        == 0
    )
    ds = IndexedDataset(out)
    assert ds.vocab_size == tok.vocab_size and ds.tokenizer_fingerprint == tok.fingerprint
    texts = [a] + [r["text"] for r in records if r["text"]]  # the empty document is skipped
    assert len(ds) == 3
    for i, text in enumerate(texts):
        assert ds.doc(i)[-1] == tok.eod
        assert tok.decode(ds.doc(i)[:-1]) == text

    preprocess_main(
        ["--input", str(tmp_path / "a.txt"), "--split-paragraphs", "--tokenizer-model", model, "--output-prefix", out]
    )
    ds = IndexedDataset(out)
    assert [tok.decode(ds.doc(i)[:-1]) for i in range(len(ds))] == ["def f():\r\n    return 1  ", "class Ü: pass"]


def test_preprocess_errors(tmp_path, corpus):
    model = corpus[2]
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    out = str(tmp_path / "ds")
    with pytest.raises(ValueError, match=r"b\.jsonl:2: no field 'text'.*--json-keys"):
        preprocess_main(["--input", str(tmp_path / "b.jsonl"), "--tokenizer-model", model, "--output-prefix", out])
    assert os.listdir(tmp_path) == ["b.jsonl"]  # nothing half-written
    (tmp_path / "c.csv").write_text("x")
    with pytest.raises(ValueError, match="unsupported extension"):
        preprocess_main(["--input", str(tmp_path / "c.csv"), "--tokenizer-model", model, "--output-prefix", out])
    (tmp_path / "d.txt").write_bytes(b"caf\xe9")  # not UTF-8: the byte becomes U+FFFD, and is counted
    stats = preprocess([str(tmp_path / "d.txt")], model, out, log=lambda *a: None)
    assert stats["utf8_replaced"] == 1 and Tokenizer(model).decode(IndexedDataset(out).doc(0)[:-1]) == "caf\ufffd"


def test_default_corpus_builds_once_and_is_reused(corpus):
    cache, prefix, model, logs = corpus
    assert any("building it once" in m for m in logs) and any("built in" in m for m in logs)
    mtime = os.path.getmtime(prefix + ".bin")
    later = []
    assert ensure_default_corpus(cache, later.append, max_bytes=150_000, vocab_size=500) == (prefix, model)
    assert later == [f"default corpus: using the cache at {cache}"]
    assert os.path.getmtime(prefix + ".bin") == mtime
    tok = Tokenizer(model)
    train, valid, _ = build_datasets(prefix, "8,2,0", 64, 1234, tok.eod, tokenizer=tok)
    assert len(train) > 0 and valid.num_documents > 0
    assert tok.decode(train[0]["tokens"].tolist())  # real text comes back
    with pytest.raises(RuntimeError, match="was built with .*delete the directory"):
        ensure_default_corpus(cache, max_bytes=150_000, vocab_size=600)


def test_default_corpus_race_loser_uses_winner(corpus):
    cache, prefix, model, _ = corpus
    logs = []
    # A second builder finishing after the first published: its rename fails and it keeps the winner's.
    default_corpus._build(cache, {"max_bytes": 150_000, "vocab_size": 500}, logs.append)
    assert "another process built" in logs[-1]
    assert sorted(os.listdir(os.path.dirname(cache))) == ["corpus", "corpus.lock"]  # its temp dir is gone
    assert ensure_default_corpus(cache, lambda m: None, max_bytes=150_000, vocab_size=500) == (prefix, model)


@pytest.mark.fault("bad-data")
def test_data_built_with_another_tokenizer(tmp_path, corpus):
    _, prefix, model, _ = corpus
    tok = Tokenizer(model)
    text = tmp_path / "other.txt"
    text.write_text(pathlib.Path(sysconfig.get_paths()["stdlib"], "textwrap.py").read_text() * 3)
    other = Tokenizer(train_tokenizer([str(text)], str(tmp_path / "other"), tok.vocab_size))
    assert (other.vocab_size, other.eod) == (tok.vocab_size, tok.eod)  # only the fingerprint tells them apart
    with pytest.raises(
        DatasetFormatError,
        match=re.escape(f"{prefix}.idx was written by another tokenizer than {other.model_path}")
        + ".*"
        + rebuild(prefix, re.escape(other.model_path)),
    ):
        build_datasets(prefix, "1", 8, 3, other.eod, tokenizer=other)
    smaller = Tokenizer(train_tokenizer([str(text)], str(tmp_path / "small"), 400))
    with pytest.raises(
        DatasetFormatError,
        match=f"vocabulary of {tok.vocab_size} but the tokenizer has 400 "
        r"\(.*small\.model\): the data was built with another tokenizer.*" + rebuild(prefix),
    ):
        build_datasets(prefix, "1", 8, 3, smaller.eod, tokenizer=smaller)
    assert len(build_datasets(prefix, "1", 8, 3, tok.eod, tokenizer=tok)[0]) > 0
