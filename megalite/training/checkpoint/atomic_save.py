"""Atomic save: every rank writes its share into ``.tmp_iter_...``; rank 0 commits."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil

import torch
import torch.distributed as dist

from .format import (
    FORMAT,
    _assign,
    _entries,
    _fsync_dir,
    _iter_name,
    _rank_file,
    _rng_state,
    _write_atomic,
)


def _standalone(t: torch.Tensor) -> torch.Tensor:
    """``t`` if it owns its whole storage, else a copy: torch.save writes entire storages."""
    return t if t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.nbytes else t.clone()


def save(save_dir: str, iteration: int, consumed: int, model, optimizer, dims, cfg) -> str:
    """Collective over the world: every rank calls it. Returns the committed checkpoint directory."""
    world = dist.group.WORLD
    name = _iter_name(iteration)
    final, tmp = os.path.join(save_dir, name), os.path.join(save_dir, ".tmp_" + name)
    if dims.rank == 0:
        os.makedirs(save_dir, exist_ok=True)
        for stale in os.listdir(save_dir):  # left by saves that crashed
            old = os.path.join(save_dir, stale)
            if stale.endswith(".old") and not os.path.exists(old[:-4]):
                os.replace(old, old[:-4])  # a re-save died between its renames: the old copy is the good one
            elif stale.startswith(".tmp_iter_") or stale.endswith(".old"):
                shutil.rmtree(old, ignore_errors=True)
        os.makedirs(tmp)
    entries = _entries(model, optimizer)
    digest = hashlib.sha1(repr(sorted((k, tuple(t.shape), str(t.dtype), d) for k, (t, d, _) in entries.items()))
                          .encode()).hexdigest()
    digests = [None] * dims.world_size
    dist.all_gather_object(digests, digest, group=world)  # also: the tmp dir exists from here on
    if len(set(digests)) != 1:
        raise RuntimeError(f"checkpoint save: ranks hold different tensor sets or shapes {digests}")
    plan = _assign(entries, dims)
    shard = dims.tp_rank
    mine = {k: _standalone(entries[k][0].cpu()) for k, w in plan.items()
            if w[shard if len(w) > 1 else 0] == dims.rank}
    path = os.path.join(tmp, _rank_file(dims.rank))
    with open(path, "wb") as fh:
        torch.save({"tensors": mine, "rng": _rng_state()}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    sizes = [None] * dims.world_size
    dist.all_gather_object(sizes, os.path.getsize(path), group=world)  # every rank has written
    if dims.rank == 0:
        index = {}
        for key, (t, dim, real) in entries.items():
            shape = list(t.shape)
            if dim is not None:
                shape[dim] *= dims.tp
            index[key] = {"shape": shape, "dtype": str(t.dtype).removeprefix("torch."), "dim": dim,
                          "files": [_rank_file(r) for r in plan[key]], **({"real": real} if real else {})}
        meta = {"format": FORMAT, "iteration": iteration, "consumed_samples": consumed,
                "global_batch_size": cfg.train.global_batch_size, "seed": cfg.train.seed,
                "layout": {"tp": dims.tp, "cp": dims.cp, "dp": dims.dp, "world": dims.world_size},
                "model": dataclasses.asdict(cfg.model), "vocab_size": model.vocab_size,
                "files": {_rank_file(r): s for r, s in enumerate(sizes)}, "tensors": index}
        _write_atomic(os.path.join(tmp, "meta.json"), json.dumps(meta, indent=1))
        if os.path.exists(final):  # re-saving an iteration: the old copy goes only once the new is in place
            os.replace(final, final + ".old")
        os.replace(tmp, final)
        shutil.rmtree(final + ".old", ignore_errors=True)
        _fsync_dir(save_dir)
        _write_atomic(os.path.join(save_dir, "latest"), name + "\n")  # the commit point
    dist.barrier(group=world)
    return final
