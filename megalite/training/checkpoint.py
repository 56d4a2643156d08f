"""Sharded, reshardable, atomic checkpoints.

Layout of ``<save>/``::

    iter_0000100/
        rank_00000.pt   this rank's share of the tensors + its RNG streams (one file per rank)
        ...
        meta.json       iteration, consumed samples, layout, model config, tensor index, file sizes
    latest              the name of the newest committed iteration directory

Every tensor is keyed by NAME: ``model/<param>`` and ``optim/<param>/<state>`` (Adam's
``exp_avg`` / ``exp_avg_sq`` shard like their parameter; ``step`` is replicated). The index in
meta.json gives each tensor's full (dense-model) shape, the dim its TP shards split (None when
replicated), and the file holding each shard. Identical copies (DP x CP replicas, and
replicated tensors on every TP rank) are written once, by the replica with the fewest bytes so
far, so all ranks write in parallel.

Loading into another layout: each rank reads, for each of its parameters, the region its new
TP rank owns, copying from whichever old shards overlap it (files are memory-mapped, so only
those bytes are read). Vocabulary tensors keep their ``vocab_size`` real rows; the padding,
which depends on TP, is re-created as zeros. LR schedule = f(iteration) and the data position
is ``consumed_samples``; both are layout independent. RNG: the same layout (TP, CP, DP)
restores every rank's streams exactly; another layout reseeds each rank from ``--seed +
iteration`` through ParallelDims.dropout_seed (per-rank streams have no meaning there; dropout
masks differ from an uninterrupted run, results are otherwise the same up to summation order).

Atomic save: ranks write into ``.tmp_iter_...``; after all have written, rank 0 writes
meta.json (with every file's size), renames the directory into place, and only then replaces
``latest`` (temp file + rename). ``latest`` is the commit point: a crash anywhere before it
leaves the previous checkpoint as the one ``--load`` resumes from.
"""
from __future__ import annotations

import dataclasses
import hashlib
import heapq
import json
import os
import random
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist

from ..config import ConfigError
from ..model import GPT
from ..parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

FORMAT = 2
VOCAB_TENSORS = ("embedding.word.weight", "output_layer.weight")  # rows = padded vocabulary
_ITER = re.compile(r"^iter_(\d+)$")
_SPLIT_DIM = {ColumnParallelLinear: 0, RowParallelLinear: 1, VocabParallelEmbedding: 0}


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
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# ---- what is saved -------------------------------------------------------------------------

def partition_dims(model: torch.nn.Module) -> dict[str, int]:
    """Parameter name -> the dim its TP shards split, for every TP-sharded parameter."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for mod in model.modules():
        dim = next((d for cls, d in _SPLIT_DIM.items() if isinstance(mod, cls)), None)
        if dim is None:
            continue
        out[names[id(mod.weight)]] = dim
        bias = getattr(mod, "bias", None)
        if bias is not None and getattr(bias, "tensor_model_parallel", False):
            out[names[id(bias)]] = 0
    unknown = [n for n, p in model.named_parameters() if getattr(p, "tensor_model_parallel", False) and n not in out]
    if unknown:
        raise RuntimeError(f"cannot checkpoint TP-sharded parameters {unknown}: their module type is not one of "
                           f"{[c.__name__ for c in _SPLIT_DIM]}, so the split dim is unknown")
    return out


def _entries(model, optimizer) -> dict[str, tuple[torch.Tensor, int | None, int | None]]:
    """key -> (local tensor, split dim or None, real rows along dim 0 for vocabulary tensors)."""
    split = partition_dims(model)
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for n, p in model.named_parameters():
        out[f"model/{n}"] = (p.detach(), split.get(n), model.vocab_size if n in VOCAB_TENSORS else None)
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
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
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


# ---- save ----------------------------------------------------------------------------------

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


# ---- find and validate ---------------------------------------------------------------------

def read_meta(ckpt_dir: str) -> dict:
    with open(os.path.join(ckpt_dir, "meta.json")) as fh:
        return json.load(fh)


def problem(ckpt_dir: str) -> str | None:
    """Why ``ckpt_dir`` is not a complete checkpoint, or None when it is."""
    try:
        meta = read_meta(ckpt_dir)
    except FileNotFoundError:
        return "no meta.json (save did not finish)"
    except (OSError, ValueError) as exc:
        return f"unreadable meta.json ({exc})"
    if meta.get("format") != FORMAT:
        return f"format {meta.get('format')} (this megalite reads format {FORMAT})"
    for name, size in meta["files"].items():
        path = os.path.join(ckpt_dir, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        if os.path.getsize(path) != size:
            return f"{name} is truncated ({os.path.getsize(path)} of {size} bytes)"
    return None


def list_checkpoints(save_dir: str) -> list[str]:
    """iter_* directory names, newest first."""
    names = [n for n in os.listdir(save_dir) if _ITER.match(n) and os.path.isdir(os.path.join(save_dir, n))]
    return sorted(names, key=lambda n: -int(_ITER.match(n).group(1)))


def read_latest(save_dir: str) -> str | None:
    try:
        with open(os.path.join(save_dir, "latest")) as fh:
            return fh.read().strip()
    except FileNotFoundError:
        return None


def resolve_load_dir(path: str, log=print) -> str | None:
    """The checkpoint ``--load path`` resumes from, or None for a fresh start.

    - ``path`` missing: ConfigError (create the directory to start a run that later resumes).
    - ``path`` is a checkpoint (has meta.json): it, if complete.
    - otherwise the checkpoint ``latest`` names if complete, else the newest complete
      ``iter_*`` (a warning names each one skipped and why);
    - no ``iter_*`` and no ``latest`` (an empty dir, or only logs and unfinished saves):
      None, with a log line;
    - ``iter_*`` or ``latest`` present but nothing complete: ConfigError listing each problem.
    """
    if not os.path.isdir(path):
        raise ConfigError(f"--load {path}: no such directory (to start a run that resumes from its own "
                          f"checkpoints, create it first: mkdir -p {path})")
    if os.path.isfile(os.path.join(path, "meta.json")):
        why = problem(path)
        if why:
            raise ConfigError(f"--load {path}: not a complete checkpoint: {why}")
        return path
    names, latest = list_checkpoints(path), read_latest(path)
    if latest is not None:
        if latest not in names:
            names.insert(0, latest)
        else:
            names.insert(0, names.pop(names.index(latest)))
    if not names:
        log(f"megalite: --load {path} holds no checkpoint yet; starting from iteration 0")
        return None
    skipped = []
    for name in names:
        ckpt = os.path.join(path, name)
        if not os.path.isdir(ckpt) and os.path.isdir(ckpt + ".old"):
            ckpt += ".old"  # set aside by a re-save of the same iteration that died before replacing it
        why = problem(ckpt) if os.path.isdir(ckpt) else "missing"
        if why is None:
            if skipped:
                log(f"megalite: warning: skipped incomplete checkpoints ({'; '.join(skipped)}); "
                    f"resuming from {name}")
            return ckpt
        skipped.append(f"{name}: {why}" + (" ('latest' names it; missing or incomplete)" if name == latest else ""))
    raise ConfigError(f"--load {path}: no complete checkpoint ({'; '.join(skipped)}); remove the broken "
                      "directories to start fresh, or point --load at a good checkpoint")


def _few(items: list[str], sep: str = ", ") -> str:
    return sep.join(items[:3]) + (f" (+{len(items) - 3} more)" if len(items) > 3 else "")


def check_compatible(meta: dict, cfg, vocab_size: int, ckpt_dir: str) -> None:
    """Fail before any collective when the checkpoint's tensors do not fit this model: names the
    first mismatching tensors (compared as dense shapes with the real vocabulary rows)."""
    with torch.device("meta"):
        dense = GPT(cfg.model, vocab_size)
    want = {n: [vocab_size, *p.shape[1:]] if n in VOCAB_TENSORS else list(p.shape)
            for n, p in dense.named_parameters()}
    have = {k.removeprefix("model/"): [e["real"], *e["shape"][1:]] if "real" in e else e["shape"]
            for k, e in meta["tensors"].items() if k.startswith("model/")}
    missing, extra = [n for n in want if n not in have], [n for n in have if n not in want]
    wrong = [f"{n} is {have[n]} in the checkpoint but {want[n]} in this model"
             for n in want if n in have and have[n] != want[n]]
    issues = ([f"tensors missing from the checkpoint: {_few(missing)}"] if missing else []) + \
             ([f"tensors not in this model: {_few(extra)}"] if extra else []) + \
             ([f"tensor {_few(wrong, '; ')}"] if wrong else [])
    if issues:
        diff = {k: (v, getattr(cfg.model, k)) for k, v in meta["model"].items()
                if hasattr(cfg.model, k) and getattr(cfg.model, k) != v}
        raise ConfigError(f"{ckpt_dir} holds a different model: {'; '.join(issues)}; "
                          f"model flags differing (checkpoint, this run): {diff}")


# ---- load ----------------------------------------------------------------------------------

class _Reader:
    """Reads regions of the checkpoint's dense tensors from the memory-mapped shard files."""

    def __init__(self, ckpt_dir: str, meta: dict):
        self.dir, self.index, self.files = ckpt_dir, meta["tensors"], {}

    def file(self, name: str) -> dict:
        if name not in self.files:
            self.files[name] = torch.load(os.path.join(self.dir, name), map_location="cpu", mmap=True,
                                          weights_only=True)
        return self.files[name]

    def region(self, key: str, local: torch.Size, dim: int | None, tp_rank: int) -> torch.Tensor:
        """The block of dense tensor ``key`` that a rank holding ``local`` (split along ``dim``,
        TP rank ``tp_rank``) owns. Rows past the real vocabulary are zeros."""
        e = self.index[key]
        lo = [0] * len(local)
        if dim is not None:
            lo[dim] = tp_rank * local[dim]
        hi = [a + n for a, n in zip(lo, local)]
        limit = list(e["shape"])
        if "real" in e:
            limit[0] = e["real"]
        out = torch.zeros(local, dtype=getattr(torch, e["dtype"]))
        for k, fname in enumerate(e["files"]):  # old shard k covers [src_lo, src_hi) of the dense tensor
            src_lo, src_hi = [0] * len(limit), list(e["shape"])
            if e["dim"] is not None:
                n = e["shape"][e["dim"]] // len(e["files"])
                src_lo[e["dim"]], src_hi[e["dim"]] = k * n, (k + 1) * n
            a = [max(x, y) for x, y in zip(lo, src_lo)]
            b = [min(x, y, z) for x, y, z in zip(hi, src_hi, limit)]
            if any(x >= y for x, y in zip(a, b)):
                continue
            dst = tuple(slice(x - o, y - o) for x, y, o in zip(a, b, lo))
            src = tuple(slice(x - o, y - o) for x, y, o in zip(a, b, src_lo))
            out[dst] = self.file(fname)["tensors"][key][src]
        return out


def _optimizer_state(reader: _Reader, model, optimizer, split: dict, tp_rank: int) -> dict:
    """torch's optimizer ``state`` ({param index: {name: tensor}}) read for this rank's shards."""
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
            per_param[k] = (reader.region(key, p.shape, split.get(n), tp_rank) if shape == dense  # exp_avg, ...
                            else reader.region(key, torch.Size(shape), None, 0))  # replicated, e.g. step
        if per_param:
            state[i] = per_param
    return state


def load(ckpt_dir: str, model, optimizer, dims, cfg, log=print) -> dict:
    """Load model, optimizer and RNG into this rank's (possibly differently laid out) model.
    Returns meta (iteration, consumed_samples). Call check_compatible first."""
    meta = read_meta(ckpt_dir)
    reader, split = _Reader(ckpt_dir, meta), partition_dims(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(reader.region(f"model/{n}", p.shape, split.get(n), dims.tp_rank))
    optimizer.load_state_dict({"state": _optimizer_state(reader, model, optimizer, split, dims.tp_rank),
                               "param_groups": optimizer.state_dict()["param_groups"]})
    lay = meta["layout"]
    same_layout = (lay["tp"], lay["cp"], lay["dp"]) == (dims.tp, dims.cp, dims.dp)
    if same_layout:
        _set_rng_state(reader.file(_rank_file(dims.rank))["rng"])
    else:
        _reseed(dims.dropout_seed(cfg.train.seed + meta["iteration"]))
    if dims.rank == 0:
        log(f"megalite: loaded {ckpt_dir} (iteration {meta['iteration']}, saved at TP={lay['tp']} CP={lay['cp']} "
            f"DP={lay['dp']})" + ("" if same_layout else f"; resharded to TP={dims.tp} CP={dims.cp} DP={dims.dp}, "
                                                         "RNG reseeded with --seed + iteration"))
        if meta["global_batch_size"] != cfg.train.global_batch_size:
            log(f"megalite: warning: --global-batch-size {cfg.train.global_batch_size} differs from the "
                f"checkpoint's {meta['global_batch_size']}: data continues at sample {meta['consumed_samples']}, "
                "but the batches differ from the original run's")
    return meta
