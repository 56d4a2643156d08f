"""Checkpoint faults on real 2-rank runs: a full disk during a save, a corrupted rank file, two runs
on one --save directory. (A rank killed mid-save: tests/test_checkpoint.py.)"""

import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys

import pytest
from multiproc import run_ranks
from pretrain_utils import TINY, losses, torchrun, train, wait_for_iteration, worker_pid

from megalite.config import ConfigError
from megalite.training import checkpoint
from megalite.training.checkpoint import integrity
from megalite.training.main import main

FLAGS = ["--global-batch-size", "4", "--micro-batch-size", "2", "--distributed-timeout-minutes", "1"]  # DP=2


@pytest.fixture(scope="module")
def saved(tmp_path_factory, corpus):
    """An uninterrupted 2-rank run of 6 iterations that saves at 2, 4 and 6."""
    tmp = tmp_path_factory.mktemp("saved")
    common = corpus + FLAGS + ["--train-iters", "6"]
    records = train(tmp, "ref", 2, common + ["--save", str(tmp / "ck"), "--save-interval", "2"])
    return records, tmp / "ck", common


def _errors(spawn_dir, world=2):
    """Each rank's traceback: every rank must have failed by itself, none been left waiting."""
    return [(spawn_dir / f"rank{r}.err").read_text() for r in range(world)]


def _disk_full_in_second_save(rank, world, argv):
    """From rank 1's second save on, files stop growing at 64 KiB (RLIMIT_FSIZE; SIGXFSZ ignored,
    so a write past it fails with EFBIG as a full disk fails with ENOSPC)."""
    real_save, calls = checkpoint.save, []

    def save(*args, **kwargs):
        calls.append(1)
        if rank == 1 and len(calls) == 2:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        return real_save(*args, **kwargs)

    checkpoint.save = save
    main(argv)


@pytest.mark.fault("disk-full")
@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="needs RLIMIT_FSIZE (Linux, macOS)")
def test_disk_full_during_save_fails_every_rank_and_keeps_the_previous_checkpoint(tmp_path, corpus, record_property):
    ck, spawn = tmp_path / "ck", tmp_path / "spawn"
    argv = (
        TINY
        + corpus
        + FLAGS
        + ["--train-iters", "6", "--save", str(ck), "--save-interval", "2", "--log-dir", str(tmp_path / "run")]
    )
    with pytest.raises(AssertionError, match="checkpoint save of iter_0000004 failed"):
        run_ranks(_disk_full_in_second_save, 2, spawn, argv)
    path = ck / ".tmp_iter_0000004" / "rank_00001.pt"
    for tb in _errors(spawn):
        assert (
            "checkpoint save of iter_0000004 failed while writing the rank files, nothing was committed "
            "('latest' still names iter_0000002): rank 1: writing " + str(path)
        ) in tb
        assert "failed after 65,536 bytes (OSError: [Errno 27] File too large)" in tb
        needed = int(re.search(r"this file needs about ([\d,]+) bytes", tb).group(1).replace(",", ""))
        same_share = (ck / "iter_0000002" / "rank_00001.pt").stat().st_size  # the same tensors, saved before
        assert needed <= same_share < needed * 1.1
        assert "Free space on the disk of --save, or point --save elsewhere" in tb
    assert [r["iteration"] for r in losses(tmp_path / "run")] == [1, 2, 3, 4]
    assert (ck / "latest").read_text() == "iter_0000002\n"
    assert sorted(os.listdir(ck)) == [".lock", "iter_0000002", "latest"]  # the partial save was removed
    good = str(ck / "iter_0000002")
    assert checkpoint.problem(good) is None and integrity.bad_files(good, checkpoint.read_meta(good)) == []
    assert (ck / ".lock").read_text() == ""  # released on the way out
    record_property(
        "observed",
        f"rank 1's files capped at 64 KiB (RLIMIT_FSIZE) during the save of iteration 4: "
        f"both ranks failed with '... rank_00001.pt failed after 65,536 bytes ([Errno 27] File "
        f"too large); this file needs about {needed:,} bytes ...'; latest still "
        "iter_0000002, which verifies; the partial save was removed",
    )


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the size stays right: only the checksum can tell
    path.write_bytes(bytes(data))


@pytest.mark.fault("corrupt-rank-file")
def test_corrupted_rank_file_is_detected_and_skipped(saved, tmp_path, capfd, record_property):
    records, ck, common = saved
    copy = tmp_path / "ck"
    shutil.copytree(ck, copy)
    _flip_a_byte(copy / "iter_0000006" / "rank_00001.pt")
    assert checkpoint.problem(str(copy / "iter_0000006")) is None  # sizes alone do not see it
    meta_path = copy / "iter_0000004" / "meta.json"  # as saved before checksums existed: size checks only
    meta = json.loads(meta_path.read_text())
    del meta["crc32"]
    meta_path.write_text(json.dumps(meta))

    capfd.readouterr()
    rest = train(tmp_path, "rest", 2, common + ["--load", str(copy)])
    out = capfd.readouterr().out
    assert re.search(
        r"warning: skipped incomplete or damaged checkpoints \(iter_0000006: rank_00001.pt is "
        r"corrupted \(CRC-32 [0-9a-f]{8}, meta.json records [0-9a-f]{8}\) \('latest' names it[^)]*\)\); "
        r"resuming from iter_0000004",
        out,
    ), out
    assert [r["iteration"] for r in rest] == [5, 6]
    assert [(r["loss"], r["grad_norm"]) for r in rest] == [(r["loss"], r["grad_norm"]) for r in records[4:]]

    spawn = tmp_path / "direct"
    with pytest.raises(AssertionError, match="rank_00001.pt is corrupted"):
        run_ranks(_main, 2, spawn, TINY + common + ["--load", str(copy / "iter_0000006")])
    for tb in _errors(spawn):
        assert (
            f"ConfigError: --load {copy / 'iter_0000006'}: not a complete checkpoint: rank_00001.pt is corrupted" in tb
        )

    shown = subprocess.run(
        [sys.executable, "-m", "megalite.training.inspect_ckpt", str(copy)], capture_output=True, text=True, check=True
    ).stdout
    assert "iter_0000006: rank_00001.pt is corrupted" in shown and "--load resumes from iter_0000004" in shown
    assert "rank_00000.pt" in shown and "no checksum (saved before megalite recorded them; size checked)" in shown
    shown = subprocess.run(
        [sys.executable, "-m", "megalite.training.inspect_ckpt", str(copy / "iter_0000006")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert re.search(r"rank_00000.pt  [\d,]+ bytes  CRC-32 ok", shown), shown
    assert re.search(r"rank_00001.pt  [\d,]+ bytes  rank_00001.pt is corrupted", shown), shown
    record_property(
        "observed",
        "one byte flipped in the newest checkpoint's rank_00001.pt (size unchanged): --load "
        "DIR warned naming it and resumed bitwise from the previous one (saved without "
        "checksums, checked by size); --load DIR/iter_0000006 failed on both ranks naming it",
    )


def _main(rank, world, argv):
    main(argv)


@pytest.mark.fault("two-runs-same-save")
def test_second_run_on_a_save_dir_refuses_and_a_dead_runs_lock_is_taken_over(tmp_path, corpus, capfd, record_property):
    ck = tmp_path / "ck"
    flags = corpus + FLAGS + ["--eval-interval", "0", "--save", str(ck)]
    first = torchrun(tmp_path, "first", flags + ["--train-iters", "100000"])
    try:
        wait_for_iteration(tmp_path, "first", first, 1)
        holder = f"pid {worker_pid(first, 0)} on {socket.gethostname()}"
        spawn = tmp_path / "second"
        with pytest.raises(AssertionError, match="is in use by another run"):
            run_ranks(_main, 2, spawn, TINY + flags + ["--train-iters", "2", "--log-dir", str(tmp_path / "second")])
        for tb in _errors(spawn):
            assert (
                f"ConfigError: --save {ck} is in use by another run ({holder}, lock {ck / '.lock'}); "
                "two runs saving into one directory would overwrite"
            ) in tb
        assert first.poll() is None  # the first run goes on
        os.kill(worker_pid(first, 0), signal.SIGKILL)  # it dies holding the lock
        assert first.wait(timeout=120) != 0
    finally:
        if first.poll() is None:
            first.kill()
    capfd.readouterr()
    records = train(tmp_path, "third", 2, flags + ["--train-iters", "2"])
    assert records[-1]["iteration"] == 2
    assert f"taking over from a run that ended without releasing it ({holder})" in capfd.readouterr().out
    assert (ck / ".lock").read_text() == ""  # released at the end
    assert checkpoint.read_latest(str(ck)) == "iter_0000002"
    record_property(
        "observed",
        "a second 2-rank run on a running run's --save failed on both ranks at start-up, "
        "naming the holder's pid and host; after the holder was SIGKILLed the next run took "
        "the lock over and released it at exit",
    )


def _verify_other_dirs(rank, world, dirs):
    with pytest.raises(ConfigError, match="ranks chose different checkpoints to load"):
        integrity.verify(dirs[rank], checkpoint.read_meta(dirs[rank]))


def test_ranks_that_see_different_checkpoints_refuse_to_load(saved, tmp_path):
    """E.g. --load on each node's own disk: the checksum check notices before any tensor is read."""
    _, ck, _ = saved
    run_ranks(_verify_other_dirs, 2, tmp_path, [str(ck / "iter_0000004"), str(ck / "iter_0000006")])
