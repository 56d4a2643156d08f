"""Context-parallel attention: communication volume, load balance, activation memory, accuracy.

Four measurements, each on spawned gloo ranks on CPU (counts do not depend on the device):

comm     Bytes each rank sends for one attention layer, forward + backward, per --cp-comm-type,
         at CP = 2 and 4 (bf16 activations, GQA). Counted by wrapping the torch.distributed
         calls the CP code makes: p2p counts the bytes of every isend; all-gather, reduce-scatter
         and all-to-all count a ring algorithm's (p-1)/p * N of the full tensor. Theory for a
         ring: (CP-1) hops of the local K/V forward, (CP-1) again backward, and (CP-1) hops of
         dK/dV in fp32. Target for p2p: measured / theory = 1.00.
balance  Attention work per rank (query-key pairs computed, summed over blocks, forward), CP=4,
         measured by wrapping the block backend; contiguous sharding (chunk r on rank r, the ring
         skipping fully masked blocks) is computed from its block schedule. Target max/mean <= 1.02.
memory   Activation bytes saved for backward by one transformer layer (saved_tensors_hooks over
         distinct storages, parameters excluded) at seq 16k: CP=4 per rank vs CP=1. Target <= 0.30.
error    Forward + backward error of bf16 ring attention against a float64 full-attention
         reference at CP = 1, 2, 4, 8 (max |err| / max |ref| over out, dq, dk, dv; and RMS).
         Target: CP=8 error <= 2 x CP=2 error.

    python benchmarks/bench_cp.py [comm balance memory error] [--seq-mem 16384]

Writes benchmarks/results/cp.json and cp.png.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import megalite.parallel.all_gather_attention as all_gather_attention
from megalite import distributed
from megalite.config import ModelConfig
from megalite.model import GPT, rope_tables
from megalite.ops.attention import get_backend
from megalite.parallel.apply_cp import CP_ATTENTION, apply_cp
from megalite.parallel.zigzag import zigzag_positions, zigzag_split

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# ---- spawning: each part runs in fresh ranks; rank 0 returns its result through a file ----


def _entry(rank, world, fn, args, tmp):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        store=dist.FileStore(os.path.join(tmp, "store"), world),
        rank=rank,
        world_size=world,
        timeout=timedelta(minutes=20),
    )
    out = fn(rank, world, *args)
    if rank == 0:
        torch.save(out, os.path.join(tmp, "result.pt"))
    dist.barrier()
    distributed.shutdown()


def spawn(fn, world, *args):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(world, fn, args, tmp), nprocs=world)
        return torch.load(os.path.join(tmp, "result.pt"))


def _inputs(seed, b, s, h, g, d, dtype):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(shape, generator=gen).to(dtype)
        for shape in [(b, s, h, d), (b, s, g, d), (b, s, g, d), (b, s, h, d)]
    ]


# ---- comm ----


class ByteCounter:
    """Wraps the collectives and p2p calls the CP code uses; counts bytes this rank sends."""

    def __init__(self):
        self.sent = 0.0
        self._saved = []

    def _wrap(self, owner, name, count):
        orig = getattr(owner, name)

        def wrapped(*args, **kw):
            self.sent += count(*args, **kw)
            return orig(*args, **kw)

        self._saved.append((owner, name, orig))
        setattr(owner, name, wrapped)

    def __enter__(self):
        def ring(t, group):
            return (dist.get_world_size(group) - 1) / dist.get_world_size(group) * t.numel() * t.element_size()

        self._wrap(
            dist,
            "batch_isend_irecv",
            lambda ops: sum(o.tensor.numel() * o.tensor.element_size() for o in ops if o.op is dist.isend),
        )
        self._wrap(dist, "all_to_all_single", lambda out, inp, group=None, **_: ring(inp, group))
        self._wrap(all_gather_attention, "all_gather_flat", lambda out, inp, group=None: ring(out, group))
        self._wrap(all_gather_attention, "reduce_scatter_flat", lambda out, inp, group=None: ring(inp, group))
        return self

    def __exit__(self, *exc):
        for owner, name, orig in reversed(self._saved):
            setattr(owner, name, orig)


def comm_part(rank, world, a):
    b, s, h, g, d = 1, a.seq_comm, 16, 4, 64  # GQA 4:1; a2a needs H and G divisible by CP
    q, k, v, dout = (zigzag_split(t, 1, world, rank) for t in _inputs(0, b, s, h, g, d, torch.bfloat16))
    kv_local = 2 * k.numel() * k.element_size()
    theory = (world - 1) * (2 * kv_local + kv_local * 4 // k.element_size())  # K/V twice, dK/dV in fp32
    rows = []
    for comm, attend in CP_ATTENTION.items():
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        with ByteCounter() as fwd:
            out = attend(qq, kk, vv, dist.group.WORLD)
        with ByteCounter() as bwd:
            out.backward(dout)
        rows.append(
            dict(
                cp=world,
                comm_type=comm,
                forward_bytes=fwd.sent,
                backward_bytes=bwd.sent,
                theory_ring_bytes=theory,
                ratio=(fwd.sent + bwd.sent) / theory,
                kv_bytes_if_gqa_expanded_ratio=h / g,
            )
        )
    return rows


# ---- balance ----


def balance_part(rank, world, a):
    b, s, h, g, d = 1, a.seq_balance, 4, 4, 32
    q, k, v, _ = (zigzag_split(t, 1, world, rank) for t in _inputs(1, b, s, h, g, d, torch.float32))
    backend, pairs = get_backend("torch_cpu"), [0]

    class Counting:
        name = "counting"

        def forward(self, q, k, v, causal, scale):
            sq, sk = q.shape[1], k.shape[1]
            pairs[0] += sq * (sq + 1) // 2 if causal else sq * sk
            return backend.forward(q, k, v, causal, scale)

    CP_ATTENTION["p2p"](q, k, v, dist.group.WORLD, backend=Counting())
    per_rank = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(per_rank, torch.tensor([float(pairs[0])], dtype=torch.float64))
    zigzag = [t.item() for t in per_rank]
    c = s // world  # contiguous: own causal block, full blocks from every earlier rank
    contiguous = [c * (c + 1) // 2 + r * c * c for r in range(world)]
    total = s * (s + 1) // 2
    return dict(
        cp=world,
        seq=s,
        needed_pairs=total,
        zigzag_pairs=zigzag,
        contiguous_pairs=contiguous,
        zigzag_max_over_mean=max(zigzag) / (sum(zigzag) / world),
        contiguous_max_over_mean=max(contiguous) / (sum(contiguous) / world),
    )


# ---- memory ----


def saved_bytes(module, *inputs):
    """Bytes of distinct non-parameter storages saved for backward by one forward."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    saved = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved.setdefault(st.data_ptr(), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(*inputs)
    return sum(saved.values())


def memory_part(rank, world, a):
    cfg = ModelConfig(
        num_layers=1,
        hidden_size=256,
        num_attention_heads=8,
        group_query_attention=True,
        num_query_groups=2,
        swiglu=True,
        normalization="RMSNorm",
        seq_length=a.seq_mem,
    )
    model = GPT(cfg, 1000, seed=1)
    if world > 1:
        apply_cp(model, dist.group.WORLD, "p2p")
    s = a.seq_mem // world
    pos = zigzag_positions(a.seq_mem, world, rank)[None]  # [1, s]
    x = torch.randn(s, 1, cfg.hidden_size, generator=torch.Generator().manual_seed(rank), requires_grad=True)
    rope = rope_tables(pos, cfg.hidden_size // cfg.num_attention_heads, cfg.rotary_base)
    return dict(cp=world, seq=a.seq_mem, local_tokens=s, saved_bytes=saved_bytes(model.layers[0], x, rope))


# ---- error ----


def error_part(rank, world, a):
    b, s, h, g, d = 1, a.seq_err, 4, 2, 64
    q, k, v, dout = _inputs(2, b, s, h, g, d, torch.bfloat16)
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(
        *(t.transpose(1, 2) for t in (qr, kr, vr)), is_causal=True, enable_gqa=True
    ).transpose(1, 2)
    ref.backward(dout.double())
    want = [zigzag_split(t.detach(), 1, world, rank) for t in (ref, qr.grad, kr.grad, vr.grad)]
    ql, kl, vl = (zigzag_split(t, 1, world, rank).requires_grad_() for t in (q, k, v))
    out = CP_ATTENTION["p2p"](ql, kl, vl, dist.group.WORLD)
    out.backward(zigzag_split(dout, 1, world, rank))
    stats = []
    for got, ref_t in zip((out, ql.grad, kl.grad, vl.grad), want):
        err = got.double() - ref_t
        t = torch.stack([err.abs().max(), ref_t.abs().max(), err.pow(2).sum(), ref_t.pow(2).sum()])
        dist.all_reduce(t[:2], op=dist.ReduceOp.MAX)
        dist.all_reduce(t[2:])
        stats.append(dict(max_rel=(t[0] / t[1]).item(), rms_rel=(t[2] / t[3]).sqrt().item()))
    names = ("out", "dq", "dk", "dv")
    return dict(
        cp=world,
        seq=s,
        **{n: st for n, st in zip(names, stats)},
        worst_max_rel=max(st["max_rel"] for st in stats),
        worst_rms_rel=max(st["rms_rel"] for st in stats),
    )


# ---- report ----


def plot(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 4, figsize=(18, 4))
    if "comm" in res:
        rows = res["comm"]
        labels = [f"{r['comm_type']}\nCP={r['cp']}" for r in rows]
        ax[0].bar(labels, [r["ratio"] for r in rows])
        ax[0].axhline(1.0, color="k", ls="--", lw=1)
        ax[0].set_title("bytes sent / ring theory (per layer, fwd+bwd)")
    if "balance" in res:
        r = res["balance"]
        x = range(r["cp"])
        ax[1].bar([i - 0.2 for i in x], r["zigzag_pairs"], 0.4, label="zigzag (measured)")
        ax[1].bar([i + 0.2 for i in x], r["contiguous_pairs"], 0.4, label="contiguous (schedule)")
        ax[1].set_title(f"attention work per rank, CP={r['cp']}")
        ax[1].set_xticks(list(x))
        ax[1].set_xlabel("CP rank")
        ax[1].legend()
    if "memory" in res:
        rows = res["memory"]
        ax[2].bar([f"CP={r['cp']}" for r in rows], [r["saved_bytes"] / 2**20 for r in rows])
        ax[2].set_title(f"saved activations per rank, 1 layer, seq {rows[0]['seq']} (MiB)")
    if "error" in res:
        rows = res["error"]
        ax[3].plot([r["cp"] for r in rows], [r["worst_max_rel"] for r in rows], "o-", label="max |err| / max |ref|")
        ax[3].plot([r["cp"] for r in rows], [r["worst_rms_rel"] for r in rows], "s-", label="RMS relative")
        ax[3].set_xscale("log", base=2)
        ax[3].set_ylim(bottom=0)
        ax[3].set_title("bf16 ring vs fp64 full attention (fwd+bwd)")
        ax[3].set_xlabel("CP")
        ax[3].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("parts", nargs="*", default=["comm", "balance", "memory", "error"])
    p.add_argument("--seq-comm", type=int, default=2048)
    p.add_argument("--seq-balance", type=int, default=4096)
    p.add_argument("--seq-mem", type=int, default=16384)
    p.add_argument("--seq-err", type=int, default=2048)
    a = p.parse_args()
    os.makedirs(RESULTS, exist_ok=True)
    out_json = os.path.join(RESULTS, "cp.json")
    res = json.load(open(out_json)) if os.path.exists(out_json) else {}
    if "comm" in a.parts:
        res["comm"] = [row for cp in (2, 4) for row in spawn(comm_part, cp, a)]
        for r in res["comm"]:
            print(
                f"comm  CP={r['cp']} {r['comm_type']:10} fwd {r['forward_bytes'] / 2**20:7.3f} MiB  "
                f"bwd {r['backward_bytes'] / 2**20:7.3f} MiB  ring theory {r['theory_ring_bytes'] / 2**20:7.3f} MiB  "
                f"ratio {r['ratio']:.3f}"
            )
    if "balance" in a.parts:
        r = res["balance"] = spawn(balance_part, 4, a)
        print(
            f"balance CP=4 seq {r['seq']}: zigzag max/mean {r['zigzag_max_over_mean']:.4f}, "
            f"contiguous {r['contiguous_max_over_mean']:.4f}; pairs per rank zigzag {r['zigzag_pairs']}"
        )
    if "memory" in a.parts:
        res["memory"] = [spawn(memory_part, cp, a) for cp in (1, 4)]
        ratio = res["memory"][1]["saved_bytes"] / res["memory"][0]["saved_bytes"]
        res["memory_ratio_cp4_over_cp1"] = ratio
        for r in res["memory"]:
            print(f"memory CP={r['cp']} seq {r['seq']}: {r['saved_bytes'] / 2**20:.1f} MiB saved per rank")
        print(f"memory ratio CP=4 / CP=1: {ratio:.3f}")
    if "error" in a.parts:
        res["error"] = [spawn(error_part, cp, a) for cp in (1, 2, 4, 8)]
        for r in res["error"]:
            print(f"error CP={r['cp']}: max rel {r['worst_max_rel']:.2e}  rms rel {r['worst_rms_rel']:.2e}")
    res["setup"] = dict(torch=torch.__version__, threads_per_rank=1, device="cpu (gloo)")
    with open(out_json, "w") as fh:
        json.dump(res, fh, indent=1)
    plot(res, os.path.join(RESULTS, "cp.png"))
    print(f"wrote {out_json} and cp.png")


if __name__ == "__main__":
    main()
