"""launch/slurm.sbatch on a real two-node SLURM cluster started on this machine (launch/local_slurm.sh)."""
import os
import random
import shutil
import socket
import subprocess
import sys

import pytest

from megalite.training import checkpoint
from pretrain_utils import ROOT, TINY, losses

pytestmark = pytest.mark.skipif(
    shutil.which("sbatch") is None or shutil.which("slurmctld") is None,
    reason="SLURM is not installed (apt-get install -y slurm-wlm munge; .ci/run installs it)")
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


def test_two_node_sbatch_trains_tp2_cp2_and_checkpoints(cluster, corpus, tmp_path):
    ck, out = tmp_path / "ck", tmp_path / "job.out"
    env = dict(cluster, GPUS_PER_NODE="2", TP="2", CP="2", CKPT_DIR=str(ck), PYTHON=sys.executable,
               MEGALITE_ROOT=ROOT, MASTER_PORT=str(free_ports(1)))
    cmd = ["sbatch", "--wait", "-N2", "-o", str(out), os.path.join(ROOT, "launch", "slurm.sbatch"),
           *TINY, *corpus, "--train-iters", "3", "--global-batch-size", "4", "--micro-batch-size", "2"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    text = out.read_text() if out.exists() else ""
    assert proc.returncode == 0, proc.stdout + proc.stderr + text[-4000:]
    assert "2 nodes x 2 ranks, TP=2 CP=2" in text and "world 4 = DP 1 x CP 2 x TP 2" in text
    assert [r["iteration"] for r in losses(ck)] == [1, 2, 3]
    meta = checkpoint.read_meta(checkpoint.resolve_load_dir(str(ck)))
    assert meta["iteration"] == 3 and meta["layout"] == {"tp": 2, "cp": 2, "dp": 1, "world": 4}
    assert sorted(meta["files"]) == [f"rank_{r:05d}.pt" for r in range(4)]
