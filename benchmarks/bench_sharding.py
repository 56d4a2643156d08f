"""Sharded data parallel (FSDP2 over DP x CP): memory per parameter, bytes sent, overlap. CPU, gloo.

For each strategy (no_shard, optim, optim_grads, optim_grads_params), d = 1, 2, 4 ranks, fp32 and
--bf16, on a 4-layer GPT (hidden 128, vocab 512) after two AdamW steps of one micro-batch:

- bytes/param at rest: storage of parameters + gradients + optimizer state on one rank (unique
  storages, FSDP2's padding included) over the dense parameter count N, against the formula
  16/d for sharded strategies and 16 for no_shard (fp32 masters 4 + fp32 gradients 4 + Adam's
  moments 8; with --bf16 the masters and the reduced gradients stay fp32, so the same);
- working set held from forward to backward: unsharded parameters still registered after the
  forward (FSDP2's all-gather output, bf16 under --bf16), against N x param bytes for no_shard and
  optim / optim_grads (reshard_after_forward=False) and 0 for optim_grads_params;
- bytes each rank sends per step, counted from the sizes FSDP2 passes to the collectives (a ring
  all-gather or reduce-scatter sends (d-1)/d of the full buffer, an all-reduce twice that),
  against theory from N: gradients (d-1)/d N x 4 (reduce-scatter, fp32) or 2(d-1)/d N x 4
  (no_shard's all-reduce); parameters (d-1)/d N x param bytes per gather, one gather per step,
  two for optim_grads_params (forward and backward);
- overlap: with --overlap-grad-reduce, the fraction of gradient bytes whose reduction was issued
  before autograd finished the backward (FSDP2's root final callback), d = 2.

    python benchmarks/bench_sharding.py

Writes benchmarks/results/sharding.json.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
from torch.distributed.tensor import DTensor

from megalite import config as C
from megalite.model import GPT
from megalite.parallel.data_parallel import finish_grads, local
from megalite.parallel.dims import ParallelDims
from megalite.parallel.parallelize import parallelize
from megalite.parallel.sharding import STRATEGIES
from megalite.training.optim import build_optimizer

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "sharding.json")
VOCAB = 500  # padded to 512


def _flags(kind: str, bf16: bool, layers: int, overlap: bool) -> list[str]:
    flags = ["--num-layers", str(layers), "--hidden-size", "128", "--num-attention-heads", "4", "--seq-length", "64"]
    flags += ["--data-parallel-sharding-strategy", kind, "--micro-batch-size", "1"]
    return flags + (["--bf16"] if bf16 else []) + (["--overlap-grad-reduce"] if overlap else [])


class _Traffic:
    """Counts the bytes FSDP2's collectives send from this rank, with issue times, while on."""

    NAMES = ("all_gather_single", "all_gather_into_tensor", "reduce_scatter_single", "reduce_scatter_tensor")

    def __init__(self):
        self.on, self.calls = False, []  # (time, kind, bytes sent)
        for name in [*self.NAMES, "all_reduce"]:
            if hasattr(dist, name):
                setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            if self.on:
                group = kwargs.get("group")
                d = dist.get_world_size(group)
                tensors = [a for a in [*args, *kwargs.values()] if torch.is_tensor(a)]
                big = max(t.nbytes for t in tensors)  # the full (unsharded) buffer
                if d > 1:
                    kind = "params" if "all_gather" in name else "grads"
                    sent = big * (d - 1) / d * (2 if name == "all_reduce" else 1)
                    self.calls.append((time.perf_counter(), kind, sent))
            return fn(*args, **kwargs)

        return counted


def _storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        s = local(t).untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def _rank(rank, world, tmp, jobs, out):
    dist.init_process_group(
        "gloo", store=dist.FileStore(os.path.join(tmp, "store"), world), rank=rank, world_size=world
    )
    torch.set_num_threads(1)
    traffic = _Traffic()
    ends = []
    final = FSDPState._root_post_backward_final_callback

    def marked(self):
        ends.append(time.perf_counter())  # autograd has computed every gradient
        return final(self)

    FSDPState._root_post_backward_final_callback = marked
    results = []
    for kind, bf16, layers, overlap in jobs:
        cfg = C.parse(_flags(kind, bf16, layers, overlap))
        cfg.train.global_batch_size = world
        dims = ParallelDims.build(cfg.parallel)
        model = GPT(cfg.model, VOCAB, seed=1)
        n = model.num_params()
        model = parallelize(model, dims, cfg, torch.device("cpu"))
        wrapped = isinstance(model, FSDPModule)
        opt = build_optimizer(model, cfg.train)
        tokens = torch.randint(0, VOCAB, (1, 64), generator=torch.Generator().manual_seed(rank))
        pos = torch.arange(64)[None]
        for step in range(2):
            traffic.calls.clear()
            ends.clear()
            traffic.on = step == 1
            loss = model(tokens, pos, tokens).float().mean()
            held = _storage_bytes(p for p in model.parameters() if not isinstance(p, DTensor)) if wrapped else None
            loss.backward()
            traffic.on = False
            finish_grads(model, dims.tp_group)
            opt.step()
        params = list(model.parameters())
        state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
        rest = _storage_bytes(params) + _storage_bytes(p.grad for p in params) + _storage_bytes(state)
        sent = {k: sum(b for _, kk, b in traffic.calls if kk == k) for k in ("params", "grads")}
        grad_calls = [(t, b) for t, kk, b in traffic.calls if kk == "grads"]
        early = sum(b for t, b in grad_calls if ends and t < ends[-1])
        results.append(
            dict(
                strategy=kind,
                bf16=bf16,
                d=world,
                layers=layers,
                overlap=overlap,
                params=n,
                rest_bytes=rest,
                held_bytes=held,
                sent=sent,
                grad_before_backward_end=early / max(1.0, sum(b for _, b in grad_calls)),
            )
        )
        del model, opt, params, state, loss
    if rank == 0:
        with open(out, "w") as fh:
            json.dump(results, fh)
    import gc

    gc.collect()
    dist.destroy_process_group()


def run(world, jobs):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        mp.spawn(_rank, args=(world, tmp, jobs, out), nprocs=world, join=True)
        return json.load(open(out))


def theory(r) -> dict:
    d, n, kind = r["d"], r["params"], r["strategy"]
    sharded = kind != "no_shard" and d > 1
    pbytes = 2 if r["bf16"] else 4
    rest = 16 / d if sharded else 16.0
    held = None if r["held_bytes"] is None else 0.0 if kind == "optim_grads_params" else pbytes
    gathers = (2 if kind == "optim_grads_params" else 1) if sharded else 0
    grads = (d - 1) / d * n * 4 * (1 if sharded else 2)
    return dict(rest=rest, held=held, params_sent=gathers * (d - 1) / d * n * pbytes, grads_sent=grads)


def main():
    rows = []
    for d in (1, 2, 4):
        jobs = [(k, bf16, 4, False) for k in STRATEGIES for bf16 in (False, True)]
        if d == 2:
            jobs += [("optim_grads_params", False, 4, True), ("optim_grads", True, 4, True)]
        for r in run(d, jobs):
            t = theory(r)
            n = r["params"]
            r.update(
                bytes_per_param=r["rest_bytes"] / n,
                bytes_per_param_formula=t["rest"],
                rest_ratio=r["rest_bytes"] / n / t["rest"],
                held_per_param=None if r["held_bytes"] is None else r["held_bytes"] / n,
                held_per_param_formula=t["held"],
                grad_sent_ratio=r["sent"]["grads"] / t["grads_sent"] if t["grads_sent"] else None,
                param_sent_ratio=r["sent"]["params"] / t["params_sent"] if t["params_sent"] else None,
            )
            rows.append(r)
            print(
                f"{r['strategy']:>18} d={d} {'bf16' if r['bf16'] else 'fp32'} L={r['layers']} "
                f"overlap={r['overlap']!s:5}: {r['bytes_per_param']:.3f} B/param (formula {t['rest']:.3f}, "
                f"ratio {r['rest_ratio']:.4f}); held fwd->bwd {r['held_per_param']} (formula {t['held']}); "
                f"sent grads/theory {r['grad_sent_ratio'] or 0:.4f} params/theory {r['param_sent_ratio'] or 0:.4f}; "
                f"grad bytes issued before backward end {r['grad_before_backward_end']:.3f}",
                flush=True,
            )
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as fh:
        json.dump({"model": "GPT 4 layers, hidden 128, vocab 512, seq 64", "rows": rows}, fh, indent=1)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
