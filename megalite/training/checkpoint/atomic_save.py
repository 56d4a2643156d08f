"""Atomic save: every rank writes its share into ``.tmp_iter_...``; rank 0 commits."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil

import torch
import torch.distributed as dist

from ...data.blend import describe as describe_data
from .format import (
    FORMAT,
    _assign,
    _entries,
    _fsync_dir,
    _iter_name,
    _rank_file,
    _rng_state,
    _slot,
    _write_atomic,
)
from .integrity import ChecksumWriter
from .resolve import read_latest


def _standalone(t: torch.Tensor) -> torch.Tensor:
    """``t`` if it owns its whole storage, else a copy: torch.save writes entire storages."""
    return t if t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.nbytes else t.clone()


def _prepare(save_dir: str, tmp: str) -> None:
    """Rank 0: clear what crashed saves left behind, create this save's temp directory."""
    os.makedirs(save_dir, exist_ok=True)
    for stale in os.listdir(save_dir):
        old = os.path.join(save_dir, stale)
        if stale.endswith(".old") and not os.path.exists(old[:-4]):
            os.replace(old, old[:-4])  # a re-save died between its renames: the old copy is the good one
        elif stale.startswith(".tmp_iter_") or stale.endswith(".old"):
            shutil.rmtree(old, ignore_errors=True)
    os.makedirs(tmp)


def _write_share(path: str, obj: dict) -> tuple[int, int]:
    """Write and fsync one rank file; returns its (size, CRC-32), computed as it is written."""
    with open(path, "wb") as fh:
        out = ChecksumWriter(fh)
        try:
            torch.save(obj, out)
        except RuntimeError as exc:
            if out.error is None:
                raise
            raise out.error from exc
        fh.flush()
        os.fsync(fh.fileno())
    return out.size, out.crc32


def _write_failure(path: str, exc: BaseException, needed: int, total: int) -> str:
    written = os.path.getsize(path) if os.path.exists(path) else 0
    try:
        free = f"{shutil.disk_usage(os.path.dirname(path)).free:,} bytes are free there"
    except OSError:
        free = "free space unknown"
    return (
        f"writing {path} failed after {written:,} bytes ({type(exc).__name__}: {exc}); this file needs about "
        f"{needed:,} bytes and the whole checkpoint about {total:,}; {free}"
    )


class SaveFailed(RuntimeError):
    """A save that every rank knows has failed (as opposed to a collective that broke)."""


def _agree(outcome, what: str, save_dir: str, name: str, world_size: int) -> list:
    """Every rank's (value, error), gathered; each rank raises the same error when any rank failed,
    so no rank goes on to a collective its peers will never join."""
    outcomes = [None] * world_size
    dist.all_gather_object(outcomes, outcome, group=dist.group.WORLD)
    errors = [f"rank {r}: {err}" for r, (_, err) in enumerate(outcomes) if err]
    if errors:
        raise SaveFailed(
            f"checkpoint save of {name} failed while {what}, nothing was committed ('latest' "
            f"still names {read_latest(save_dir)}): {'; '.join(errors)}. Free space on the disk "
            "of --save, or point --save elsewhere, then resume"
        )
    return [value for value, _ in outcomes]


def _commit(save_dir: str, tmp: str, name: str, meta: dict) -> None:
    """Rank 0, once every rank file is in ``tmp``: meta.json, rename into place, then ``latest``."""
    final = os.path.join(save_dir, name)
    _write_atomic(os.path.join(tmp, "meta.json"), json.dumps(meta, indent=1))
    if os.path.exists(final):  # re-saving an iteration: the old copy goes only once the new is in place
        os.replace(final, final + ".old")
    os.replace(tmp, final)
    shutil.rmtree(final + ".old", ignore_errors=True)
    _fsync_dir(save_dir)
    _write_atomic(os.path.join(save_dir, "latest"), name + "\n")  # the commit point


def save(save_dir: str, iteration: int, consumed: int, model, optimizer, dims, cfg) -> str:
    """Collective over the world: every rank calls it. Returns the committed checkpoint directory.
    A failure on any rank (e.g. a full disk) raises the same error on every rank, leaves the
    previous checkpoint and ``latest`` as they were, and removes the unfinished directory."""
    name = _iter_name(iteration)
    tmp = os.path.join(save_dir, ".tmp_" + name)
    failed = None
    if dims.rank == 0:
        try:
            _prepare(save_dir, tmp)
        except OSError as exc:
            failed = f"creating {tmp} failed ({type(exc).__name__}: {exc})"
    entries = _entries(model, optimizer)
    digest = hashlib.sha1(
        repr(sorted((k, tuple(e.shape), str(e.tensor.dtype), e.dim, e.pieces) for k, e in entries.items())).encode()
    ).hexdigest()
    digests = _agree((digest, failed), "preparing", save_dir, name, dims.world_size)  # tmp exists from here on
    if len(set(digests)) != 1:
        raise RuntimeError(f"checkpoint save: ranks hold different tensor sets or shapes {digests}")
    plan = _assign(entries, dims)
    mine = {k: _standalone(e.tensor.cpu()) for k, e in entries.items() if plan[k][_slot(e, dims.tp_rank)] == dims.rank}
    path = os.path.join(tmp, _rank_file(dims.rank))
    try:
        written, failed = _write_share(path, {"tensors": mine, "rng": _rng_state()}), None
    except OSError as exc:
        total = sum(e.piece_bytes * len(plan[k]) for k, e in entries.items())
        written, failed = None, _write_failure(path, exc, sum(t.nbytes for t in mine.values()), total)
    try:
        files = _agree((written, failed), "writing the rank files", save_dir, name, dims.world_size)
    except SaveFailed:
        if dims.rank == 0:  # every rank is past its write: give the space back
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    verdict = [None]
    if dims.rank == 0:
        index = {}
        for key, e in entries.items():
            shape = list(e.shape)
            if e.dim is not None:
                shape[e.dim] *= dims.tp
            index[key] = {
                "shape": shape,
                "dtype": str(e.tensor.dtype).removeprefix("torch."),
                "dim": e.dim,
                "files": [_rank_file(r) for r in plan[key]],
                **({"real": e.real} if e.real else {}),
                **({"pieces": e.pieces} if e.pieces > 1 else {}),
            }
        meta = {
            "format": FORMAT,
            "iteration": iteration,
            "consumed_samples": consumed,
            "global_batch_size": cfg.train.global_batch_size,
            "seed": cfg.train.seed,
            "data": describe_data(cfg.data),
            "layout": {"tp": dims.tp, "cp": dims.cp, "dp": dims.dp, "world": dims.world_size},
            "model": dataclasses.asdict(cfg.model),
            "vocab_size": model.vocab_size,
            "files": {_rank_file(r): size for r, (size, _) in enumerate(files)},
            "crc32": {_rank_file(r): crc for r, (_, crc) in enumerate(files)},
            "tensors": index,
        }
        try:
            _commit(save_dir, tmp, name, meta)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            verdict = [f"committing failed ({type(exc).__name__}: {exc})"]
    dist.broadcast_object_list(verdict, src=0, group=dist.group.WORLD)  # rank 0's commit, told to all
    if verdict[0]:
        raise SaveFailed(
            f"checkpoint save of {name} failed on rank 0: {verdict[0]} ('latest' names {read_latest(save_dir)})"
        )
    return os.path.join(save_dir, name)
