"""Helpers for tests that run the real training entry point on spawned ranks."""
import json
import os
import sysconfig

from megalite.data.preprocess import preprocess
from megalite.data.tokenizer import train_tokenizer
from megalite.training.main import main
from multiproc import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--lr", "3e-3", "--lr-warmup-iters", "1", "--eval-interval", "3", "--eval-iters", "1", "--log-interval", "1"]


def build_corpus(tmp_path_factory):
    """A small real corpus (three stdlib modules) and its 512-piece tokenizer; returns the data flags."""
    d = tmp_path_factory.mktemp("corpus")
    src = sysconfig.get_paths()["stdlib"]
    text = d / "text.txt"
    text.write_text("".join(open(os.path.join(src, f)).read() for f in ("textwrap.py", "shlex.py", "fnmatch.py")))
    tok = train_tokenizer([str(text)], str(d / "tok"), 512)
    preprocess([str(text)], tok, str(d / "data"), split_paragraphs=True, log=lambda *a: None)
    return ["--data-path", str(d / "data"), "--tokenizer-model", tok]


def _main(rank, world, argv):
    main(argv)


def losses(log_dir):
    with open(os.path.join(log_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def train(tmp_path, name, world, argv):
    out = tmp_path / name
    run_ranks(_main, world, tmp_path / f"spawn-{name}", TINY + argv + ["--log-dir", str(out)])
    return losses(out)


