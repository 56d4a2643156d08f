"""Resharding load: each rank reads the regions of the dense tensors its new layout owns (its TP
shard, and of that its FSDP2 piece), never the whole model."""

from __future__ import annotations

import os

import torch
from torch.distributed.tensor import DTensor

from ...parallel.data_parallel import local
from .format import _rank_file, _reseed, _set_rng_state, _split, partition_dims, piece_box
from .resolve import read_meta


class _Reader:
    """Reads regions of the checkpoint's dense tensors from the memory-mapped shard files."""

    def __init__(self, ckpt_dir: str, meta: dict):
        self.dir, self.index, self.files = ckpt_dir, meta["tensors"], {}

    def file(self, name: str) -> dict:
        if name not in self.files:
            self.files[name] = torch.load(
                os.path.join(self.dir, name), map_location="cpu", mmap=True, weights_only=True
            )
        return self.files[name]

    def region(self, key: str, lo: list, hi: list, dtype: torch.dtype) -> torch.Tensor:
        """The box [lo, hi) of dense tensor ``key``, as ``dtype`` (bf16 and fp32 convert here).
        Rows past the real vocabulary are zeros."""
        e = self.index[key]
        limit = list(e["shape"])
        if "real" in e:
            limit[0] = e["real"]
        pieces = e.get("pieces", 1)
        out = torch.zeros([b - a for a, b in zip(lo, hi)], dtype=dtype)
        for f, fname in enumerate(e["files"]):  # file f holds piece j of TP shard t
            t, j = divmod(f, pieces)
            src_lo, src_hi = piece_box(e["shape"], e["dim"], len(e["files"]) // pieces, t, pieces, j)
            a = [max(x, y) for x, y in zip(lo, src_lo)]
            b = [min(x, y, z) for x, y, z in zip(hi, src_hi, limit)]
            if any(x >= y for x, y in zip(a, b)):
                continue
            dst = tuple(slice(x - o, y - o) for x, y, o in zip(a, b, lo))
            src = tuple(slice(x - o, y - o) for x, y, o in zip(a, b, src_lo))
            out[dst] = self.file(fname)["tensors"][key][src]
        return out


def _box(p, dim: int | None, tp: int, tp_rank: int) -> tuple[list, list]:
    """The box of this rank's own dense tensor that parameter ``p`` holds here."""
    dense = list(p.shape)  # a DTensor's shape is the whole TP shard
    if dim is not None:
        dense[dim] *= tp
    pieces, j = _split(p)
    return piece_box(dense, dim, tp, tp_rank, pieces, j)


def _like(p, values: torch.Tensor) -> torch.Tensor:
    """``values`` (this rank's piece) laid out like parameter ``p``: a DTensor for FSDP2 parameters."""
    values = values.to(p.device)
    if isinstance(p, DTensor):
        return DTensor.from_local(
            values, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
        )
    return values


def _optimizer_state(reader: _Reader, model, optimizer, split: dict, dims) -> dict:
    """torch's optimizer ``state`` ({param index: {name: tensor}}) read for this rank's pieces."""
    keys = {}
    for key in reader.index:
        if key.startswith("optim/"):
            n, _, k = key.removeprefix("optim/").rpartition("/")
            keys.setdefault(n, []).append((key, k))
    names = {id(p): n for n, p in model.named_parameters()}
    state = {}
    for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"]):
        n = names[id(p)]
        dense = reader.index[f"model/{n}"]["shape"]
        per_param = {}
        for key, k in keys.get(n, []):
            shape = reader.index[key]["shape"]
            if shape == dense:  # exp_avg, ...
                per_param[k] = _like(p, reader.region(key, *_box(p, split.get(n), dims.tp, dims.tp_rank), p.dtype))
            else:  # replicated, e.g. step
                per_param[k] = reader.region(key, [0] * len(shape), shape, torch.float32)
        if per_param:
            state[i] = per_param
    return state


def load(ckpt_dir: str, model, optimizer, dims, cfg, log=print) -> dict:
    """Load model, optimizer and RNG into this rank's (possibly differently laid out) model.
    Returns meta (iteration, consumed_samples; both 0 under --finetune). Call check_compatible first.
    --finetune loads the weights only (Megatron's meaning); --no-load-optim and --no-load-rng
    leave out one part each. A checkpoint without RNG streams (megalite-import-hf) reseeds."""
    ck = cfg.checkpoint
    meta = read_meta(ckpt_dir)
    reader, split = _Reader(ckpt_dir, meta), partition_dims(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            local(p).copy_(reader.region(f"model/{n}", *_box(p, split.get(n), dims.tp, dims.tp_rank), p.dtype))
    if ck.load_optim and not ck.finetune:
        optimizer.load_state_dict(
            {
                "state": _optimizer_state(reader, model, optimizer, split, dims),
                "param_groups": optimizer.state_dict()["param_groups"],
            }
        )
    if ck.finetune:
        meta = {**meta, "iteration": 0, "consumed_samples": 0}
    lay = meta["layout"]
    same_layout = (lay["tp"], lay["cp"], lay["dp"]) == (dims.tp, dims.cp, dims.dp)
    rng = reader.file(_rank_file(dims.rank)).get("rng") if same_layout and ck.load_rng and not ck.finetune else None
    if rng is not None:
        _set_rng_state(rng)
    else:
        _reseed(dims.dropout_seed(cfg.train.seed + meta["iteration"]))
    if dims.rank == 0:
        parts = "weights only (--finetune)" if ck.finetune else f"iteration {meta['iteration']}"
        log(
            f"megalite: loaded {ckpt_dir} ({parts}, saved at TP={lay['tp']} CP={lay['cp']} DP={lay['dp']})"
            + ("" if same_layout else f"; resharded to TP={dims.tp} CP={dims.cp} DP={dims.dp}")
            + ("" if ck.load_optim or ck.finetune else "; optimizer state not loaded (--no-load-optim)")
            + ("" if rng is not None else "; RNG reseeded with --seed + iteration")
        )
        saved_batch = meta["global_batch_size"]  # None: written by megalite-import-hf, never trained
        if not ck.finetune and saved_batch not in (None, cfg.train.global_batch_size):
            log(
                f"megalite: warning: --global-batch-size {cfg.train.global_batch_size} differs from the "
                f"checkpoint's {meta['global_batch_size']}: data continues at sample {meta['consumed_samples']}, "
                "but the batches differ from the original run's"
            )
    return meta
