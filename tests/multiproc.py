"""Spawn gloo ranks on CPU for multi-rank tests.

Rendezvous goes through a FileStore in the test's tmp dir (no port races). Each rank writes
its traceback to a file; the parent raises the earliest one, because a crash on one rank
otherwise surfaces as "connection reset" on the others.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megalite import distributed

COLLECTIVE_TIMEOUT_S = 60


def _entry(rank, world, fn, tmp, args):
    torch.set_num_threads(1)
    err = os.path.join(tmp, f"rank{rank}.err")
    failed = False
    try:
        store = dist.FileStore(os.path.join(tmp, "store"), world)
        dist.init_process_group(
            "gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S)
        )
        fn(rank, world, *args)
        if dist.is_initialized():  # fn may have torn the groups down itself
            dist.barrier()
    except BaseException:
        with open(err + ".tmp", "w") as fh:  # renamed into place: the parent never reads half a file
            fh.write(f"{time.time():.6f}\n{traceback.format_exc()}")
        os.replace(err + ".tmp", err)
        failed = True
    distributed.shutdown()  # outside the except: its traceback would keep fn's groups alive
    if failed:
        sys.exit(1)


def run_ranks(fn, world: int, tmp, *args, timeout: float = 300):
    """Run fn(rank, world, *args) on `world` gloo ranks; re-raise the first rank failure."""
    tmp = str(tmp)
    os.makedirs(tmp, exist_ok=True)
    ctx = mp.start_processes(_entry, args=(world, fn, tmp, args), nprocs=world, join=False, start_method="spawn")
    deadline = time.time() + timeout
    try:
        while not ctx.join(timeout=max(1.0, deadline - time.time())):
            if time.time() > deadline:
                raise TimeoutError(f"ranks did not finish within {timeout}s")
    except Exception as exc:
        for p in ctx.processes:  # peers of a failed rank fail soon after; let them write their traceback
            p.join(timeout=max(0.0, min(10.0, deadline - time.time())))
        errs = []
        for r in range(world):
            path = os.path.join(tmp, f"rank{r}.err")
            if os.path.exists(path):
                stamp, _, tb = open(path).read().partition("\n")
                errs.append((float(stamp), r, tb))
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
        if errs:
            stamp, r, tb = min(errs)
            raise AssertionError(f"rank {r} failed first:\n{tb}") from exc
        raise
