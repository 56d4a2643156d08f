"""pretrain.py under torchrun: kill -9 + --max-restarts resumes exactly, SIGTERM saves and exits,
a stuck rank makes the others fail with a message naming rank and operation."""

import os
import signal
import time

import pytest
from pretrain_utils import losses, output, torchrun, wait_for_iteration, worker_pid

from megalite.training import checkpoint

ITERS = 30
FLAGS = [
    "--train-iters",
    str(ITERS),
    "--global-batch-size",
    "4",
    "--micro-batch-size",
    "2",
    "--eval-interval",
    "0",
    "--distributed-timeout-minutes",
    "1",
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus):
    tmp = tmp_path_factory.mktemp("elastic")
    agent = torchrun(tmp, "ref", FLAGS + corpus)
    assert agent.wait(timeout=600) == 0, output(tmp, "ref")[-3000:]
    return losses(tmp / "ref")


@pytest.mark.fault("kill-mid-step")
def test_kill_minus_9_restarts_from_latest_checkpoint(tmp_path, corpus, reference, record_property):
    ck = tmp_path / "ck"  # the script creates it; empty, so the first attempt starts fresh
    agent = torchrun(tmp_path, "run", FLAGS + corpus + ["--save-interval", "3"], CKPT_DIR=str(ck), MAX_RESTARTS="1")
    wait_for_iteration(tmp_path, "run", agent, 5)
    os.kill(worker_pid(agent, 1), signal.SIGKILL)
    assert agent.wait(timeout=600) == 0, output(tmp_path, "run")[-3000:]
    text = output(tmp_path, "run")
    assert "holds no checkpoint yet; starting from iteration 0" in text and "resuming" in text
    records = losses(tmp_path / "run")
    assert len(records) > ITERS, "no iteration was repeated: the kill came too late"
    last = {r["iteration"]: r for r in records}
    assert sorted(last) == list(range(1, ITERS + 1))
    for ref in reference:  # every record, before and after the restart, equals the uninterrupted run's
        assert all(
            r["loss"] == ref["loss"] and r["grad_norm"] == ref["grad_norm"]
            for r in records
            if r["iteration"] == ref["iteration"]
        ), ref["iteration"]
    assert checkpoint.read_latest(str(ck)) == f"iter_{ITERS:07d}"
    redone = len(records) - ITERS
    record_property(
        "observed",
        f"rank 1 SIGKILLed after iteration 5 (2 ranks, --save-interval 3): torchrun restarted "
        f"both, {redone} iterations were redone from the checkpoint, every logged loss and "
        "grad norm equals the uninterrupted run's",
    )


@pytest.mark.fault("sigterm-save")
def test_sigterm_saves_on_every_rank_and_exits_cleanly(tmp_path, corpus, reference, record_property):
    ck = tmp_path / "ck"
    agent = torchrun(tmp_path, "run", FLAGS + corpus + ["--save", str(ck), "--exit-signal-handler"])
    wait_for_iteration(tmp_path, "run", agent, 3)
    os.kill(worker_pid(agent, 1), signal.SIGTERM)  # one rank hears it; all must stop at the same step
    assert agent.wait(timeout=600) == 0, output(tmp_path, "run")[-3000:]
    records = losses(tmp_path / "run")
    stop = records[-1]["iteration"]
    assert stop < ITERS and f"exit signal received: stopping after iteration {stop}" in output(tmp_path, "run")
    meta = checkpoint.read_meta(checkpoint.resolve_load_dir(str(ck)))
    assert meta["iteration"] == stop and meta["consumed_samples"] == records[-1]["consumed_samples"]
    assert [r["loss"] for r in records] == [r["loss"] for r in reference[:stop]]
    record_property("observed", f"SIGTERM to rank 1: both ranks stopped after iteration {stop}, saved it, exit 0")


@pytest.mark.fault("stopped-rank")
def test_stuck_rank_times_out_naming_rank_and_operation(tmp_path, corpus, record_property):
    agent = torchrun(tmp_path, "run", FLAGS + corpus + ["--distributed-timeout-minutes", "0.15"])
    wait_for_iteration(tmp_path, "run", agent, 2)
    stuck = worker_pid(agent, 1)
    os.kill(stuck, signal.SIGSTOP)
    blamed = "rank 0 (dp 0, cp 0, tp 0): "
    try:
        deadline = time.time() + 120
        while blamed not in output(tmp_path, "run") and time.time() < deadline:
            time.sleep(0.2)
    finally:
        os.kill(stuck, signal.SIGKILL)  # torchrun would otherwise wait 30 s for the stopped rank
    assert agent.wait(timeout=120) != 0
    text = output(tmp_path, "run")
    line = next((ln for ln in text.splitlines() if blamed in ln), None)
    assert line, text[-3000:]
    assert "failed (a peer did not join within --distributed-timeout-minutes 0.15" in line and "imed out" in line
    record_property("observed", "rank 1 SIGSTOPped: rank 0 failed with '" + line[line.index(blamed) :][:90] + "...'")
