import glob
import json
import os

import pytest
import sentencepiece as spm

from megalite.data.tokenizer import Tokenizer, main, sample_lines, train_tokenizer

# The json package's sources: real code, on every machine, small enough to train on in well under 1 s.
SOURCES = sorted(glob.glob(os.path.join(os.path.dirname(json.__file__), "*.py")))

ODD_TEXTS = [
    "",
    "def f(x):\n\tif x  :   \n        return 'héllo wörld'\n\n\n  \t trailing   \n",
    "windows\r\nline endings\r\n",
    "  leading spaces, ∑ 日本語 🙂 and a NUL \x00 byte",
    "x=1;y  =  2\n\n\n\n# comment with Ελληνικά\n",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("tok") / "sub" / "tok")
    return Tokenizer(train_tokenizer(SOURCES, prefix, vocab_size=600))


@pytest.mark.parametrize("text", ODD_TEXTS)
def test_round_trip_is_exact(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_round_trip_of_real_code(tok):
    for path in SOURCES:
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
        assert tok.decode(tok.encode(text)) == text, path
    assert tok.encode_batch(ODD_TEXTS) == [tok.encode(t) for t in ODD_TEXTS]


def test_special_ids_and_vocab(tok):
    assert tok.vocab_size == 600
    assert (tok.eod, spm.SentencePieceProcessor(model_file=tok.model_path).pad_id()) == (2, 3)  # README's ids
    assert tok.eod not in tok.encode("some text\n")
    # Indentation is learned as whole pieces, newline is one piece.
    assert len(tok.encode("        ")) == 1
    assert len(tok.encode("\n")) == 1


def test_missing_model_names_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model.*--tokenizer-model"):
        Tokenizer(str(tmp_path / "nope.model"))


def test_model_without_eos_is_rejected(tmp_path):
    spm.SentencePieceTrainer.train(
        input=SOURCES, model_prefix=str(tmp_path / "noeos"), vocab_size=300, eos_id=-1, minloglevel=2
    )
    with pytest.raises(ValueError, match="no end-of-sentence piece"):
        Tokenizer(str(tmp_path / "noeos.model"))


def test_train_rejects_missing_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_tokenizer([str(tmp_path / "missing.txt")], str(tmp_path / "t"), 500)


def test_cli(tmp_path, capsys):
    prefix = tmp_path / "out" / "tok"
    assert main(["--input", *SOURCES[:2], SOURCES[2], "--model-prefix", str(prefix), "--vocab-size", "500"]) == 0
    assert "vocab 500, eod id 2" in capsys.readouterr().out
    tok = Tokenizer(str(prefix) + ".model")
    assert tok.decode(tok.encode(ODD_TEXTS[1])) == ODD_TEXTS[1]


def test_sampled_training_lines(tmp_path):
    """--input-sentence-size: a uniform sample without replacement, deterministic, over all files."""
    import gzip

    (tmp_path / "a.txt").write_text("".join(f"line {i}\n" for i in range(6000)))
    with gzip.open(tmp_path / "b.txt.gz", "wt") as f:
        f.write("".join(f"line {i}\n" for i in range(6000, 10000)))
    files = [str(tmp_path / "a.txt"), str(tmp_path / "b.txt.gz")]
    sample = sample_lines(files, 200)
    index = [int(s.split()[1]) for s in sample]
    assert len(set(index)) == 200 and all(0 <= i < 10000 for i in index)
    assert 4000 < sum(index) / 200 < 6000 and sum(i >= 6000 for i in index) > 40  # both files, spread out
    assert sample_lines(files, 200) == sample and sample_lines(files, 200, seed=1) != sample
    assert sorted(sample_lines(files, 20000)) == sorted(f"line {i}" for i in range(10000))
    tok = Tokenizer(train_tokenizer(files, str(tmp_path / "t"), 280, input_sentence_size=500))
    assert tok.decode(tok.encode("line 123\n")) == "line 123\n"
