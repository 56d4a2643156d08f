"""What a checkpoint holds: file names, the tensor index (name -> local tensor, split dim,
real vocabulary rows), which rank writes each shard, RNG streams, and atomic small-file writes."""

from __future__ import annotations

import heapq
import os
import random
import re

import numpy as np
import torch

from ...parallel.tensor_parallel import split_dim

FORMAT = 2
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


def _entries(model, optimizer) -> dict[str, tuple[torch.Tensor, int | None, int | None]]:
    """key -> (local tensor, split dim or None, real rows along dim 0 for vocabulary tensors)."""
    split = partition_dims(model)
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for n, p in model.named_parameters():
        real = model.vocab_size if n in model.VOCAB_PARAMETERS else None
        out[f"model/{n}"] = (p.detach(), split.get(n), real)
    for group in optimizer.param_groups:
        for p in group["params"]:
            n = names[id(p)]
            for k, v in optimizer.state.get(p, {}).items():
                if not torch.is_tensor(v):
                    raise RuntimeError(f"optimizer state {k!r} of {n} is a {type(v).__name__}, not a tensor")
                like_param = v.shape == p.shape  # exp_avg, exp_avg_sq; not step
                out[f"optim/{n}/{k}"] = (v.detach(), *(out[f"model/{n}"][1:] if like_param else (None, None)))
    return out


def _assign(entries, dims) -> dict[str, list[int]]:
    """key -> writer rank of each TP shard ([one] for replicated tensors). Each shard goes to the
    least-loaded rank that holds it (TP rank s: ranks r with r % TP == s). Every rank computes the
    same plan: local shapes are equal on all TP ranks (checked by the digest in save)."""
    heaps = [[(0, r) for r in range(s, dims.world_size, dims.tp)] for s in range(dims.tp)]
    plan = {}
    for key, (t, dim, _) in sorted(entries.items(), key=lambda kv: (-kv[1][0].nbytes, kv[0])):
        shards = range(dims.tp) if dim is not None else [min(range(dims.tp), key=lambda s: heaps[s][0])]
        writers = []
        for s in shards:
            load, r = heapq.heappop(heaps[s])
            heapq.heappush(heaps[s], (load + t.nbytes, r))
            writers.append(r)
        plan[key] = writers
    return plan


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
