"""Process exit: a finished run exits 0 and a failed one exits non-zero, never by SIGABRT or a hang.

Under torch 2.13 + gloo a process group still alive at interpreter exit aborts the process in
about one 2-rank run in three ("terminate called without an active exception"); see
megalite.distributed.shutdown. A race like that hides from a single run, hence the soak.
"""

import os
import shutil
import subprocess
import textwrap
import weakref

import pytest
import torch.distributed as dist
from multiproc import run_ranks
from pretrain_utils import TINY, losses, run_pretrain

from megalite import distributed
from megalite.parallel.dims import ParallelDims
from megalite.training.main import main

SOAK_RUNS = 20
LAYOUTS = [  # (ranks, flags): every grid shape with 2 and 4 ranks
    (2, []),
    (2, ["--tensor-parallel-size", "2"]),
    (2, ["--context-parallel-size", "2"]),
    (4, ["--tensor-parallel-size", "2", "--context-parallel-size", "2", "--sequence-parallel"]),
    (4, ["--tensor-parallel-size", "2"]),
]
SHORT = [
    "--train-iters",
    "2",
    "--global-batch-size",
    "4",
    "--micro-batch-size",
    "1",
    "--eval-interval",
    "2",
    "--distributed-timeout-minutes",
    "1",
]
ABORTED = ("terminate called", "SIGABRT", "Signal 6", "exitcode  : -6", "Fatal Python error")


def torchrun(tmp_path, name, ranks, argv, script=None, timeout=240):
    """Run pretrain.py (or `script`) under torchrun; returns (exit code, output)."""
    try:
        done = run_pretrain(tmp_path, ranks, [*SHORT, *argv, "--log-dir", str(tmp_path / name)], script, timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{name}: hung for {timeout}s\n{exc.stdout}\n{exc.stderr}")
    return done.returncode, done.stdout + done.stderr


@pytest.mark.fault("clean-exit-soak")
def test_soak_finished_runs_exit_zero(tmp_path, corpus, record_property):
    failures = []
    for i in range(SOAK_RUNS):
        ranks, flags = LAYOUTS[i % len(LAYOUTS)]
        save = ["--save", str(tmp_path / f"ck{i}")] if i % 4 == 0 else []  # outputs flushed before exit too
        code, out = torchrun(tmp_path, f"run{i}", ranks, corpus + flags + save)
        if code != 0 or any(s in out for s in ABORTED):
            failures.append(f"run {i} ({ranks} ranks {flags}): exit {code}\n{out[-2000:]}")
        elif losses(tmp_path / f"run{i}")[-1]["iteration"] != 2:
            failures.append(f"run {i}: metrics.jsonl incomplete")
    assert not failures, f"{len(failures)} of {SOAK_RUNS} runs failed:\n" + "\n".join(failures)
    record_property(
        "observed", f"{SOAK_RUNS} of {SOAK_RUNS} pretrain.py runs (DP2, TP2, CP2, TP2xCP2+SP, TP2xDP2) exited 0"
    )


@pytest.mark.fault("clean-exit-soak")
def test_config_error_exits_nonzero_with_its_message(tmp_path, corpus, record_property):
    for _ in range(3):
        code, out = torchrun(tmp_path, "bad", 2, corpus + ["--context-parallel-size", "3"])
        assert code != 0 and "world size 2 is not divisible" in out, out[-3000:]
        assert not any(s in out for s in ABORTED), out[-3000:]
    record_property("observed", "a config error, 3 runs: each exits non-zero with its message, no abort")


RAISE_ON_RANK_1 = """
    import os, sys
    from megalite.training import loop, main

    step = loop.train_step
    def failing(model, optimizer, batches, dims, *args, **kw):
        if dims.rank == 1 and failing.calls == 1:
            raise RuntimeError("injected failure on rank 1")
        failing.calls += 1
        return step(model, optimizer, batches, dims, *args, **kw)
    failing.calls = 0
    loop.train_step = failing
    sys.argv[0] = "pretrain.py"
    main.cli()
"""


@pytest.mark.fault("clean-exit-soak")
def test_exception_on_one_rank_exits_nonzero_without_hang(tmp_path, corpus, record_property):
    script = tmp_path / "raising.py"
    script.write_text(textwrap.dedent(RAISE_ON_RANK_1))
    for layout in (["--tensor-parallel-size", "2"], ["--context-parallel-size", "2"]):
        code, out = torchrun(tmp_path, "raise", 2, corpus + layout, script=str(script))
        assert code != 0 and "RuntimeError: injected failure on rank 1" in out, out[-3000:]
        assert not any(s in out for s in ABORTED), out[-3000:]
    record_property(
        "observed",
        "an exception raised on rank 1 (TP2, then CP2): both runs exit non-zero with its traceback, no abort or hang",
    )


def _groups_die(rank, world, argv):
    built = []
    original = ParallelDims.build

    def recording(cfg):
        dims = original(cfg)
        built.extend(weakref.ref(g) for g in (dims.tp_group, dims.cp_group, dims.dp_cp_group))
        return dims

    ParallelDims.build = staticmethod(recording)
    main(argv)
    distributed.shutdown()
    assert not dist.is_initialized()
    assert built and all(ref() is None for ref in built), "a process group outlived shutdown()"


# Under FSDP2 (any DP x CP > 1) torch 2.13 keeps the DP x CP group alive past
# destroy_process_group through a reference gc cannot see (a closure cell held outside Python
# objects); the soak above still exits 0 in every run. strict: tells us when torch stops doing it.
FSDP_KEEPS_GROUP = pytest.mark.xfail(strict=True, reason="FSDP2 holds the DP x CP group past shutdown (torch 2.13)")


@pytest.mark.parametrize(
    "layout",
    [
        pytest.param(["--context-parallel-size", "2"], marks=FSDP_KEEPS_GROUP),
        ["--tensor-parallel-size", "2", "--sequence-parallel"],
    ],
)
def test_shutdown_leaves_no_process_group_alive(tmp_path, corpus, layout):
    """The mechanism behind the soak, checked directly: once shutdown() returns, nothing holds a
    group that interpreter teardown would have to destroy."""
    argv = TINY + SHORT + corpus + layout + ["--log-dir", str(tmp_path / "log")]
    run_ranks(_groups_die, 2, tmp_path / "spawn", argv)


@pytest.mark.fault("clean-exit-soak")
def test_data_error_exits_2_with_the_file_named(tmp_path, corpus, record_property):
    data, tok = corpus[corpus.index("--data-path") + 1], corpus[corpus.index("--tokenizer-model") + 1]
    for ext in (".bin", ".idx"):
        shutil.copy(data + ext, tmp_path / f"short{ext}")
    with open(tmp_path / "short.bin", "r+b") as fh:
        fh.truncate(os.path.getsize(data + ".bin") // 2)
    argv = ["--data-path", str(tmp_path / "short"), "--tokenizer-model", tok]
    code, out = torchrun(tmp_path, "short", 2, argv)
    assert code != 0 and "short.bin" in out and "megalite: error:" in out, out[-3000:]
    assert "exitcode  : 2" in out and "DatasetFormatError" not in out, out[-3000:]  # a message, not a traceback
    assert not any(s in out for s in ABORTED), out[-3000:]
    record_property("observed", "a truncated .bin: exit 2 with the message naming it, no traceback, no abort")
