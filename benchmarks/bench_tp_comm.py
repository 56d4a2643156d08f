"""Tensor/sequence-parallel communication volume and activation memory per transformer layer.

For TP = 2 and 4, with and without sequence parallel, on one layer of a Llama-style model
(SwiGLU, RMSNorm, GQA, no biases) and a GPT-style one (GELU, LayerNorm, MHA, biases):

- Bytes each TP rank sends through megalite.parallel.comm (CommCounter), forward and
  backward. "Bytes sent" is a ring algorithm's per-rank traffic over p ranks for a full tensor
  of N bytes: all-gather and reduce-scatter send (p-1)/p * N, all-reduce sends 2 (p-1)/p * N.
  Megatron's theory per layer: 4 all-reduces of s*b*h (2 forward, 2 backward), i.e.
  8 (p-1)/p * s*b*h * itemsize; with SP the same volume as 4 all-gathers + 4 reduce-scatters.
  Target ratio measured / theory = 1.00. The gradient sums of replicated parameters under SP
  (norm weights, row-parallel biases: O(h) per layer) are reported on their own line.
- Bytes of activations saved for backward per rank (saved_tensors_hooks over distinct
  storages, parameters excluded), split into the TP regions (attention, MLP) and the rest of
  the layer (norms, dropout masks, residual adds), which SP shards: target SP / no-SP = 1/TP
  for the rest; the TP regions keep their full-sequence inputs.

Runs 4 gloo ranks on CPU (spawned here); the counts do not depend on the device.

    python benchmarks/bench_tp_comm.py [--seq 256 --batch 2 --hidden 256 --heads 8]

Writes benchmarks/results/tp_comm.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megalite import distributed
from megalite.config import ModelConfig
from megalite.model import GPT, rope_tables
from megalite.parallel.apply_tp import apply_tp
from megalite.parallel.comm import CommCounter

WORLD = 4
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "tp_comm.json")


def model_configs(a):
    common = dict(
        num_layers=1,
        hidden_size=a.hidden,
        num_attention_heads=a.heads,
        seq_length=a.seq,
        hidden_dropout=0.1,
        make_vocab_size_divisible_by=8,
    )
    return {
        "llama (SwiGLU, RMSNorm, GQA)": ModelConfig(
            **common,
            swiglu=True,
            normalization="RMSNorm",
            group_query_attention=True,
            num_query_groups=a.heads // 2,
            add_bias_linear=False,
        ),
        "gpt (GELU, LayerNorm, MHA, biases)": ModelConfig(**common),
    }


def measure_layer(block, x, rope):
    """Comm records and saved-activation bytes by region for one layer's forward + backward."""
    param_storages = {p.untyped_storage().data_ptr() for p in block.parameters()}
    region, saved = ["rest"], {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            saved.setdefault(storage.data_ptr(), (region[0], storage.nbytes()))
        return t

    def enter(*_):
        region[0] = "tp_region"

    def leave(*_):
        region[0] = "rest"

    handles = [
        h
        for m in (block.attention, block.mlp)
        for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))
    ]
    with CommCounter() as counter:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = block(x, rope)
        y.backward(torch.ones_like(y))
    for h in handles:
        h.remove()
    by_region = collections.Counter()
    for name, nbytes in saved.values():
        by_region[name] += nbytes
    return counter.records, dict(by_region, total=sum(by_region.values()))


def run_case(name, cfg, group, sp, a):
    tp = dist.get_world_size(group)
    torch.manual_seed(0)
    block = apply_tp(GPT(cfg, 1000, seed=1), group, sp).layers[0].train()
    s_local = a.seq // tp if sp else a.seq
    x = torch.randn(s_local, a.batch, a.hidden, requires_grad=True)
    pos = torch.arange(a.seq).expand(a.batch, a.seq)
    rope = rope_tables(pos, cfg.head_dim, cfg.rotary_base)
    records, saved = measure_layer(block, x, rope)

    sbh_bytes = a.seq * a.batch * a.hidden * x.element_size()
    theory = 8 * (tp - 1) / tp * sbh_bytes
    sent = collections.Counter()
    ops = collections.Counter()
    for r in records:
        sent[r.phase] += r.sent_bytes
        ops[f"{r.phase}:{r.op}"] += 1
    return dict(
        model=name,
        tp=tp,
        sequence_parallel=sp,
        forward_sent_bytes=sent["forward"],
        backward_sent_bytes=sent["backward"],
        theory_sent_bytes=theory,
        ratio=(sent["forward"] + sent["backward"]) / theory,
        grad_sum_sent_bytes=sent["grad"],
        collectives=dict(sorted(ops.items())),
        saved_activation_bytes=saved,
    )


def worker(rank, a, store_dir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", store=dist.FileStore(os.path.join(store_dir, "store"), WORLD), rank=rank, world_size=WORLD
    )
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank joins both
    results = []
    for group in (pairs[rank // 2], dist.group.WORLD):
        for name, cfg in model_configs(a).items():
            for sp in (False, True):
                results.append(run_case(name, cfg, group, sp, a))
    if rank == 0:
        report(results, a)
    distributed.shutdown()


def report(results, a):
    mb = 1 / 2**20
    print(f"per layer, s={a.seq} b={a.batch} h={a.hidden} fp32; bytes sent per TP rank (ring)")
    print(
        f"{'model':36} {'tp':>2} {'sp':>5} {'fwd MiB':>8} {'bwd MiB':>8} {'theory':>8} {'ratio':>6} "
        f"{'grad KiB':>8} {'saved rest MiB':>14} {'saved TP-region MiB':>19}"
    )
    for r in results:
        sv = r["saved_activation_bytes"]
        print(
            f"{r['model']:36} {r['tp']:>2} {str(r['sequence_parallel']):>5} {r['forward_sent_bytes'] * mb:8.3f} "
            f"{r['backward_sent_bytes'] * mb:8.3f} {r['theory_sent_bytes'] * mb:8.3f} {r['ratio']:6.3f} "
            f"{r['grad_sum_sent_bytes'] / 1024:8.2f} {sv.get('rest', 0) * mb:14.3f} {sv.get('tp_region', 0) * mb:19.3f}"
        )
    memory = []
    key = {(r["model"], r["tp"], r["sequence_parallel"]): r["saved_activation_bytes"] for r in results}
    for (model, tp, sp), sv in key.items():
        if sp:
            base = key[(model, tp, False)]
            memory.append(
                dict(
                    model=model,
                    tp=tp,
                    target=1 / tp,
                    rest_ratio=sv["rest"] / base["rest"],
                    tp_region_ratio=sv["tp_region"] / base["tp_region"],
                    total_ratio=sv["total"] / base["total"],
                )
            )
    print("\nsaved activations, SP / no SP")
    for m in memory:
        print(
            f"{m['model']:36} tp={m['tp']}  rest {m['rest_ratio']:.3f} (target {m['target']:.3f})  "
            f"TP regions {m['tp_region_ratio']:.3f}  whole layer {m['total_ratio']:.3f}"
        )
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as fh:
        json.dump(
            dict(
                setup=dict(
                    vars(a),
                    dtype="float32",
                    world=WORLD,
                    torch=torch.__version__,
                    bytes_sent="ring: all-gather/reduce-scatter (p-1)/p*N, all-reduce 2(p-1)/p*N",
                ),
                per_layer=results,
                sp_memory=memory,
            ),
            fh,
            indent=1,
        )
    print(f"\nwrote {OUT}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as store_dir:
        mp.spawn(worker, args=(a, store_dir), nprocs=WORLD)


if __name__ == "__main__":
    main()
