"""Helpers for tests that run the real training entry point on spawned ranks."""

import json
import os
import subprocess
import sys
import sysconfig
import time

from multiproc import run_ranks

from megalite.data.preprocess import preprocess
from megalite.data.tokenizer import train_tokenizer
from megalite.training.main import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--num-layers",
    "2",
    "--hidden-size",
    "64",
    "--num-attention-heads",
    "4",
    "--seq-length",
    "32",
    "--lr",
    "3e-3",
    "--lr-warmup-iters",
    "1",
    "--eval-interval",
    "3",
    "--eval-iters",
    "1",
    "--log-interval",
    "1",
]


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


def torchrun(tmp_path, name, argv, **env):
    """Start launch/torchrun.sh (2 ranks) with `env` added; output goes to tmp_path/name.log."""
    log = open(tmp_path / f"{name}.log", "w")
    cmd = ["bash", os.path.join(ROOT, "launch", "torchrun.sh"), *TINY, *argv, "--log-dir", str(tmp_path / name)]
    env = dict(os.environ, NPROC_PER_NODE="2", PYTHON=sys.executable, OMP_NUM_THREADS="1", **env)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env=env)


def run_pretrain(tmp_path, ranks, argv, script=None, timeout=600, **env):
    """Run pretrain.py (or ``script``) to its end under torchrun on ``ranks`` CPU ranks; returns
    the CompletedProcess (output captured as text)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
    cmd += [script or os.path.join(ROOT, "pretrain.py"), *TINY, *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([ROOT, *sys.path]), **env)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)


def output(tmp_path, name):
    return (tmp_path / f"{name}.log").read_text()


def worker_pid(agent: subprocess.Popen, rank: int) -> int:
    """The pid of the worker with global rank `rank` among the torchrun agent's children."""
    children = open(f"/proc/{agent.pid}/task/{agent.pid}/children").read().split()
    for pid in children:
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return int(pid)
    raise LookupError(f"no worker with RANK={rank} among {children}")


def wait_for_iteration(tmp_path, name, agent, iteration, timeout=300):
    """Block until metrics.jsonl shows `iteration`; returns the records so far."""
    path, deadline = tmp_path / name / "metrics.jsonl", time.time() + timeout
    while time.time() < deadline:
        assert agent.poll() is None, output(tmp_path, name)[-3000:]
        if path.exists():
            records = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
            if records and records[-1]["iteration"] >= iteration:
                return records
        time.sleep(0.02)
    raise TimeoutError(f"iteration {iteration} not reached")
