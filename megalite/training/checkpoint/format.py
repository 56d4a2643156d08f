"""What a checkpoint holds: file names, the tensor index (name -> local tensor, TP split dim,
real vocabulary rows, DP x CP pieces), which rank writes each piece, RNG streams, and atomic small-file writes."""

from __future__ import annotations

import os
import random
import re
from typing import NamedTuple

import numpy as np
import torch
from torch.distributed.tensor import Shard

from ...parallel.data_parallel import is_dp_sharded, local
from ...parallel.tensor_parallel import split_dim

FORMAT = 3  # 3 added "pieces": tensors split over DP x CP by FSDP2
READABLE = (2, FORMAT)  # a format-2 checkpoint is a format-3 one without pieces
_ITER = re.compile(r"^iter_(\d+)$")
_UNFINISHED = re.compile(r"^\.tmp_iter_\d+$")  # a save's directory until every rank has written


def _iter_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):  # e.g. a full disk: leave nothing half-written behind
            os.remove(tmp)
        raise


def partition_dims(model: torch.nn.Module) -> dict[str, int]:
    """Parameter name -> the dim its TP shards split (its ``tp_split_dim``), for every TP-sharded
    parameter, whatever module holds it."""
    return {n: d for n, p in model.named_parameters() if (d := split_dim(p)) is not None}


class _Entry(NamedTuple):
    """One checkpointed tensor as this rank holds it."""

    tensor: torch.Tensor  # this rank's piece
    shape: torch.Size  # the TP shard's full shape (equal on all ranks)
    dim: int | None  # the dim TP splits, None when replicated over TP
    real: int | None  # real vocabulary rows along dim 0
    pieces: int = 1  # FSDP2 pieces of the TP shard along its dim 0 (over DP x CP)
    piece: int = 0  # which of them this rank holds

    @property
    def piece_bytes(self) -> int:
        """Bytes of one piece, from shapes alone, so every rank plans the same writes."""
        return self.shape.numel() * self.tensor.element_size() // self.pieces


def _split(t: torch.Tensor) -> tuple[int, int]:
    """(pieces, this rank's piece) of a tensor FSDP2 split on dim 0 over DP x CP; (1, 0) otherwise."""
    if not is_dp_sharded(t):
        return 1, 0
    (i,) = [i for i, pl in enumerate(t.placements) if isinstance(pl, Shard) and t.device_mesh.size(i) > 1]
    if t.placements[i].dim != 0:
        raise RuntimeError(f"checkpoint: a tensor sharded on dim {t.placements[i].dim} over DP x CP; expected dim 0")
    return t.device_mesh.size(i), t.device_mesh.get_local_rank(i)


def piece_box(shape, dim: int | None, tp: int, t: int, pieces: int = 1, j: int = 0) -> tuple[list, list]:
    """[lo, hi) in the dense tensor of ``shape`` of TP shard ``t`` (of ``tp``, split along ``dim``),
    piece ``j`` of ``pieces`` along the shard's dim 0: FSDP2's torch.chunk split, so rows
    ceil(n / pieces) each, the last pieces shorter or empty."""
    lo, hi = [0] * len(shape), list(shape)
    if dim is not None:
        n = shape[dim] // tp
        lo[dim], hi[dim] = t * n, (t + 1) * n
    if pieces > 1:
        rows = hi[0] - lo[0]
        c = -(-rows // pieces)
        lo[0], hi[0] = lo[0] + min(j * c, rows), lo[0] + min((j + 1) * c, rows)
    return lo, hi


def _entries(model, optimizer) -> dict[str, _Entry]:
    split = partition_dims(model)
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for n, p in model.named_parameters():
        real = model.vocab_size if n in model.VOCAB_PARAMETERS else None
        out[f"model/{n}"] = _Entry(local(p.detach()), p.shape, split.get(n), real, *_split(p))
    for group in optimizer.param_groups:
        for p in group["params"]:
            n = names[id(p)]
            for k, v in optimizer.state.get(p, {}).items():
                if not torch.is_tensor(v):
                    raise RuntimeError(f"optimizer state {k!r} of {n} is a {type(v).__name__}, not a tensor")
                if v.shape == p.shape:  # exp_avg, exp_avg_sq: laid out like the parameter
                    out[f"optim/{n}/{k}"] = out[f"model/{n}"]._replace(tensor=local(v.detach()))
                else:  # step
                    out[f"optim/{n}/{k}"] = _Entry(v.detach(), v.shape, None, None)
    return out


def _assign(entries, dims) -> dict[str, list[int]]:
    """key -> writer rank of each piece, TP shard-major ([one] for replicated tensors). A piece
    split over DP x CP is written by the rank holding it (the DP x CP rank j of TP rank s is
    global rank j * TP + s); a TP shard held whole by several ranks goes to the least-loaded of
    them. Every rank computes the same plan (shapes are checked equal by the digest in save)."""
    loads = [0] * dims.world_size
    plan = {}
    for key, e in sorted(entries.items(), key=lambda kv: (-kv[1].piece_bytes, kv[0])):
        writers = []
        for s in range(dims.tp) if e.dim is not None else [None]:
            if e.pieces > 1:
                if s is None:  # replicated over TP: the pieces of the least-loaded TP rank
                    s = min(range(dims.tp), key=lambda t: (sum(loads[t :: dims.tp]), t))
                ranks = [j * dims.tp + s for j in range(e.pieces)]
            else:
                holders = range(dims.world_size) if s is None else range(s, dims.world_size, dims.tp)
                ranks = [min(holders, key=lambda r: (loads[r], r))]
            for r in ranks:
                loads[r] += e.piece_bytes
            writers += ranks
        plan[key] = writers
    return plan


def _slot(e: _Entry, tp_rank: int) -> int:
    """Index of this rank's piece in its tensor's list of writers."""
    return (tp_rank if e.dim is not None else 0) * e.pieces + e.piece


def _rng_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _reseed(seed: int) -> None:
    torch.manual_seed(seed)  # also every CUDA device
    random.seed(seed)
    np.random.seed(seed % 2**32)
