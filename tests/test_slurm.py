"""launch/slurm.sbatch on a real two-node SLURM cluster started on this machine (launch/local_slurm.sh)."""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from pretrain_utils import ROOT, TINY, losses

from megalite.training import checkpoint

pytestmark = pytest.mark.skipif(
    shutil.which("sbatch") is None or shutil.which("slurmctld") is None,
    reason="SLURM is not installed (apt-get install -y slurm-wlm munge; .ci/run installs it)",
)
LOCAL_SLURM = os.path.join(ROOT, "launch", "local_slurm.sh")


def free_ports(n: int) -> int:
    """A base port p with p .. p+n-1 all free."""
    for _ in range(100):
        base = random.randrange(20000, 30000)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("slurm")
    subprocess.run(["bash", LOCAL_SLURM, "start", str(d), str(free_ports(3))], check=True, timeout=120)
    try:
        yield dict(os.environ, SLURM_CONF=str(d / "slurm.conf"))
    finally:
        subprocess.run(["bash", LOCAL_SLURM, "stop", str(d)], timeout=60)


def last_iteration(metrics) -> int:
    lines = [ln for ln in metrics.read_text().splitlines() if ln.endswith("}")]  # skip a half-written line
    return json.loads(lines[-1])["iteration"] if lines else 0


def worker_with_rank(rank: int, marker: str) -> int:
    """pid of the pretrain.py process with RANK=rank whose command line contains `marker`."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if b"pretrain.py" in cmd and marker.encode() in cmd and f"RANK={rank}".encode() in env:
            return int(pid)
    raise LookupError(f"no worker with RANK={rank}")


def test_two_node_sbatch_tp2_cp2_checkpoints_and_survives_kill_minus_9(cluster, corpus, tmp_path):
    """sbatch -N2, 2 ranks per node, TP=2 x CP=2 on gloo; rank 3 is SIGKILLed mid-run: both nodes'
    torchruns restart their ranks, which resume from the latest checkpoint and finish."""
    ck, out, iters = tmp_path / "ck", tmp_path / "job.out", 40
    env = dict(
        cluster,
        GPUS_PER_NODE="2",
        TP="2",
        CP="2",
        CKPT_DIR=str(ck),
        PYTHON=sys.executable,
        MEGALITE_ROOT=ROOT,
        MASTER_PORT=str(free_ports(1)),
        MAX_RESTARTS="1",
    )
    cmd = [
        "sbatch",
        "--wait",
        "-N2",
        "-o",
        str(out),
        os.path.join(ROOT, "launch", "slurm.sbatch"),
        *TINY,
        *corpus,
        "--train-iters",
        str(iters),
        "--save-interval",
        "5",
        "--eval-interval",
        "0",
        "--global-batch-size",
        "4",
        "--micro-batch-size",
        "2",
        "--distributed-timeout-minutes",
        "2",
    ]
    job = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while not (ck / "latest").exists() or last_iteration(ck / "metrics.jsonl") < 7:
            assert job.poll() is None and time.time() < deadline, out.read_text()[-4000:]
            time.sleep(0.02)
        os.kill(worker_with_rank(3, str(ck)), signal.SIGKILL)
        assert job.wait(timeout=600) == 0, job.stdout.read() + out.read_text()[-4000:]
    finally:
        if job.poll() is None:
            job.kill()
    text = out.read_text()
    assert "2 nodes x 2 ranks, TP=2 CP=2" in text and "world 4 = DP 1 x CP 2 x TP 2" in text
    assert "resuming" in text
    records = losses(ck)
    assert len(records) > iters and sorted({r["iteration"] for r in records}) == list(range(1, iters + 1))
    meta = checkpoint.read_meta(checkpoint.resolve_load_dir(str(ck)))
    assert meta["iteration"] == iters and meta["layout"] == {"tp": 2, "cp": 2, "dp": 1, "world": 4}
    assert sorted(meta["files"]) == [f"rank_{r:05d}.pt" for r in range(4)]
