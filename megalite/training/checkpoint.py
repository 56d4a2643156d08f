"""Atomic checkpoints: everything needed to continue a run bit for bit.

Layout of ``<save>/``::

    iter_0000100/
        meta.json        iteration, consumed samples, layout, model config (written last)
        model_tp00.pt    model + optimizer state of TP rank 0 (one file per TP rank;
                         written by the DP x CP rank 0 that holds that shard)
        rng_r00000.pt    RNG states of global rank 0 (one per rank: dropout streams differ)
    latest               the name of the newest complete iteration directory

A save writes into ``.tmp_iter_...``, renames it into place once every rank has written, and
only then replaces ``latest`` (temp file + rename). A crash at any point therefore leaves the
previous checkpoint and pointer intact.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist

from ..config import ConfigError

FORMAT = 1


def _iter_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def resolve_load_dir(path: str) -> str:
    """The checkpoint directory --load refers to; a ConfigError if there is none."""
    if not os.path.isdir(path):
        raise ConfigError(f"--load {path}: no such directory")
    if os.path.isfile(os.path.join(path, "meta.json")):
        return path
    pointer = os.path.join(path, "latest")
    if not os.path.isfile(pointer):
        raise ConfigError(f"--load {path}: not a checkpoint (no 'latest' file and no meta.json); "
                          "point it at a --save directory")
    with open(pointer) as fh:
        name = fh.read().strip()
    ckpt = os.path.join(path, name)
    if not os.path.isfile(os.path.join(ckpt, "meta.json")):
        raise ConfigError(f"--load {path}: 'latest' names {name}, which is missing or incomplete")
    return ckpt


def read_meta(ckpt_dir: str) -> dict:
    with open(os.path.join(ckpt_dir, "meta.json")) as fh:
        return json.load(fh)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(save_dir: str, iteration: int, consumed: int, model, optimizer, dims, cfg) -> str:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    final = os.path.join(save_dir, _iter_name(iteration))
    tmp = os.path.join(save_dir, ".tmp_" + _iter_name(iteration))
    if dims.rank == 0:
        os.makedirs(save_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    if dims.dp_rank == 0 and dims.cp_rank == 0:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()},
                   os.path.join(tmp, f"model_tp{dims.tp_rank:02d}.pt"))
    torch.save(_rng_state(), os.path.join(tmp, f"rng_r{dims.rank:05d}.pt"))
    dist.barrier()
    if dims.rank == 0:
        meta = {"format": FORMAT, "iteration": iteration, "consumed_samples": consumed,
                "layout": {"tp": dims.tp, "cp": dims.cp, "dp": dims.dp},
                "model": dataclasses.asdict(cfg.model), "vocab_size": model.vocab_size}
        _write_atomic(os.path.join(tmp, "meta.json"), json.dumps(meta, indent=1))
        if os.path.exists(final):  # re-saving the same iteration: keep the old one until the new is in place
            old = final + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _write_atomic(os.path.join(save_dir, "latest"), _iter_name(iteration) + "\n")
    dist.barrier()
    return final


def check_compatible(meta: dict, cfg, vocab_size: int, ckpt_dir: str) -> None:
    """Fail before loading anything (and before any collective) when the checkpoint cannot continue this run."""
    lay, tp, cp = meta["layout"], cfg.parallel.tensor_parallel_size, cfg.parallel.context_parallel_size
    if (lay["tp"], lay["cp"]) != (tp, cp):
        raise ConfigError(f"{ckpt_dir} was saved with TP={lay['tp']} CP={lay['cp']}; this run has "
                          f"TP={tp} CP={cp}. Load it with the same sizes")
    mismatch = {k: (v, getattr(cfg.model, k)) for k, v in meta["model"].items()
                if k in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                         "ffn_hidden_size", "swiglu", "normalization", "kv_channels")
                and getattr(cfg.model, k) != v}
    if meta["vocab_size"] != vocab_size:
        mismatch["vocab_size"] = (meta["vocab_size"], vocab_size)
    if mismatch:
        raise ConfigError(f"{ckpt_dir} holds a different model: (checkpoint, this run) = {mismatch}")


def load(ckpt_dir: str, model, optimizer, dims) -> dict:
    """Load model, optimizer and this rank's RNG; returns meta (iteration, consumed samples)."""
    meta = read_meta(ckpt_dir)
    state = torch.load(os.path.join(ckpt_dir, f"model_tp{dims.tp_rank:02d}.pt"), map_location="cpu",
                       weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    rng = os.path.join(ckpt_dir, f"rng_r{dims.rank:05d}.pt")
    if os.path.exists(rng):
        _set_rng_state(torch.load(rng, weights_only=False))
    return meta
