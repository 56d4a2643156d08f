"""Hierarchical context parallel (--cp-comm-type a2a+p2p) against flat p2p and a2a: bytes each
rank sends per transformer layer, and activation memory.

One Llama-style layer (SwiGLU, RMSNorm, RoPE; GQA and MHA) at CP = 4 on 4 gloo ranks, bf16:
flat p2p (ring over 4), flat a2a (all-to-all over 4; MHA only, it needs KV heads divisible by
CP), and a2a+p2p at A x P = 2 x 2, 4 x 1 and 1 x 4. A "node" is A consecutive CP ranks (2 for
the flat layouts, so their inter-node traffic compares with the 2 x 2 split).

- Bytes sent: torch.distributed's batch_isend_irecv and all_to_all_single are wrapped here and
  every byte leaving a rank is counted (an all-to-all's piece for the rank itself is not sent),
  forward and backward, split by whether the peer sits on another node. Theory per layer, local
  sequence s = S/CP, b sequences, H query / G KV heads of dim D, element size e, accumulator
  size e_acc (fp32 dK/dV on the ring's backward):
    p2p      (CP-1) * 2bsGD * (2e + e_acc)        K/V hops fwd + bwd, dK/dV hops
    a2a      2 (CP-1)/CP * bsD (2H + 2G) e          q/k/v + out forward, the reverse backward
    a2a+p2p  2 (A-1)/A * bsD (2H + 2G') e  +  (P-1) * 2bsG'D * (2e + e_acc),  G' = max(G, A)
  (G' > G when KV heads are repeated to reach A). Inter-node theory, busiest rank: p2p all of
  it (the rank at a node's edge sends every hop across), a2a 2 (CP-A)/CP * ..., a2a+p2p the
  ring term only. Target ratio measured / theory = 1.00.
- Activation memory: bytes of tensors saved for backward (saved_tensors_hooks over distinct
  storages, parameters excluded), for the whole layer and for the core attention alone. Ulysses
  (a2a, a2a+p2p) keeps one more s x hidden tensor per layer than p2p: the attention output in
  the gathered layout is saved by the attention, the one after the all-to-all back by the
  output projection (under p2p both are the same storage); repeated KV heads are saved too.

    python benchmarks/bench_hier_cp.py [--seq 2048 --batch 1 --hidden 512 --heads 8]

Writes benchmarks/results/hier_cp.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megalite import distributed
from megalite.config import ModelConfig, ParallelConfig
from megalite.model import GPT, rope_tables
from megalite.parallel.apply_cp import apply_cp
from megalite.parallel.dims import ParallelDims
from megalite.parallel.zigzag import zigzag_positions

CP = 4
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "hier_cp.json")
LAYOUTS = [("p2p", 2), ("a2a", 2), ("a2a+p2p", 2), ("a2a+p2p", 4), ("a2a+p2p", 1)]  # (comm, A = ranks per node)


class Wire:
    """Counts bytes this rank sends through the two calls the CP attentions use."""

    def __init__(self, node_size):
        self.node_size, self.phase = node_size, "forward"
        self.sent = {(p, w): 0 for p in ("forward", "backward") for w in ("intra", "inter")}
        self._orig = dist.batch_isend_irecv, dist.all_to_all_single

    def _add(self, peer, nbytes):
        where = "intra" if peer // self.node_size == dist.get_rank() // self.node_size else "inter"
        self.sent[(self.phase, where)] += nbytes

    def __enter__(self):
        batch, a2a = self._orig

        def counted_batch(ops):
            for op in ops:
                if op.op is dist.isend:
                    self._add(op.peer, op.tensor.nbytes)
            return batch(ops)

        def counted_a2a(output, input, group=None, **kw):
            n, me = dist.get_world_size(group), dist.get_rank(group)
            for j in range(n):
                if j != me:
                    self._add(dist.get_global_rank(group, j), input.nbytes // n)
            return a2a(output, input, group=group, **kw)

        dist.batch_isend_irecv, dist.all_to_all_single = counted_batch, counted_a2a
        return self

    def __exit__(self, *exc):
        dist.batch_isend_irecv, dist.all_to_all_single = self._orig

    def total(self, where=None):
        return sum(v for (_, w), v in self.sent.items() if where in (None, w))


def theory(comm, a, b, s, h, g, d, e, e_acc):
    """(total, inter-node on the busiest rank) bytes per layer; see the module docstring."""
    if comm == "p2p":
        t = (CP - 1) * 2 * b * s * g * d * (2 * e + e_acc)
        return t, t
    if comm == "a2a":
        per_peer = 2 * b * s * d * (2 * h + 2 * g) * e / CP
        return (CP - 1) * per_peer, (CP - a) * per_peer
    p, g2 = CP // a, max(g, a)
    ring = (p - 1) * 2 * b * s * g2 * d * (2 * e + e_acc)
    return 2 * (a - 1) / a * b * s * d * (2 * h + 2 * g2) * e + ring, ring


def saved_bytes(block, x, rope):
    """Saved-for-backward bytes of the whole layer and of its core attention, and the wire counts."""
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    saved, region = {}, ["layer"]

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved.setdefault(st.data_ptr(), (region[0], st.nbytes()))
        return t

    attn = block.attention.core_attention
    hooks = [
        attn.register_forward_pre_hook(lambda *_: region.__setitem__(0, "attention")),
        attn.register_forward_hook(lambda *_: region.__setitem__(0, "layer")),
    ]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = block(x, rope)
    for hk in hooks:
        hk.remove()
    return y, sum(n for _, n in saved.values()), sum(n for r, n in saved.values() if r == "attention")


def run_case(cfg, comm, a, args):
    rank = dist.get_rank()
    pc = ParallelConfig(context_parallel_size=CP, cp_comm_type=comm)
    if comm == "a2a+p2p":
        pc.hierarchical_context_parallel_sizes = [a, CP // a]
    dims = ParallelDims.build(pc)
    group = (dims.cp_a2a_group, dims.cp_ring_group) if comm == "a2a+p2p" else dims.cp_group
    block = apply_cp(GPT(cfg, 1000, seed=1), group, comm).layers[0].to(torch.bfloat16).train()
    s = args.seq // CP
    torch.manual_seed(rank)
    x = torch.randn(s, args.batch, args.hidden, dtype=torch.bfloat16, requires_grad=True)  # [s, b, h]
    pos = zigzag_positions(args.seq, CP, rank, inner=a if comm == "a2a+p2p" else 1).expand(args.batch, s)
    rope = rope_tables(pos, cfg.head_dim, cfg.rotary_base)
    with Wire(a) as wire:
        y, layer_bytes, attn_bytes = saved_bytes(block, x, rope)
        wire.phase = "backward"
        y.backward(torch.ones_like(y))
    per_rank = torch.tensor([wire.total(), wire.total("inter"), layer_bytes, attn_bytes], dtype=torch.float64)
    gathered = [torch.zeros_like(per_rank) for _ in range(CP)]
    dist.all_gather(gathered, per_rank)
    busiest = torch.stack(gathered).max(0).values.tolist()
    want, want_inter = theory(comm, a, args.batch, s, cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_dim, 2, 4)
    return dict(
        comm=comm,
        a2a_size=a if comm != "p2p" else None,
        ring_size=CP // a if comm == "a2a+p2p" else (CP if comm == "p2p" else None),
        node_size=a,
        sent_bytes=busiest[0],
        forward_sent_bytes=wire.sent[("forward", "intra")] + wire.sent[("forward", "inter")],
        theory_bytes=want,
        ratio=busiest[0] / want,
        inter_node_bytes=busiest[1],
        theory_inter_node_bytes=want_inter,
        inter_ratio=busiest[1] / want_inter if want_inter else (1.0 if busiest[1] == 0 else float("inf")),
        saved_layer_bytes=busiest[2],
        saved_attention_bytes=busiest[3],
    )


def worker(rank, args, store_dir):
    torch.set_num_threads(1)
    store = dist.FileStore(os.path.join(store_dir, "store"), CP)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=CP)
    common = dict(
        num_layers=1,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        seq_length=args.seq,
        swiglu=True,
        normalization="RMSNorm",
        add_bias_linear=False,
        make_vocab_size_divisible_by=8,
    )
    models = {
        f"GQA {args.heads}q/2kv": ModelConfig(**common, group_query_attention=True, num_query_groups=2),
        f"MHA {args.heads}": ModelConfig(**common),
    }
    results = []
    for name, cfg in models.items():
        for comm, a in LAYOUTS:
            if comm == "a2a" and cfg.num_kv_heads % CP:  # flat a2a refuses KV heads that do not split over CP
                continue
            results.append(dict(model=name, **run_case(cfg, comm, a, args)))
    if rank == 0:
        report(results, args)
    distributed.shutdown()


def report(results, args):
    mib = 1 / 2**20
    print(f"CP={CP}, one layer, seq {args.seq} b {args.batch} hidden {args.hidden} bf16; busiest rank")
    print(
        f"{'model':16} {'layout':14} {'sent MiB':>9} {'theory':>8} {'ratio':>6} {'inter-node':>10} {'theory':>8} "
        f"{'ratio':>6} {'saved layer':>11} {'vs p2p':>6} {'saved attn':>10} {'vs p2p':>6}"
    )
    base = {r["model"]: r for r in results if r["comm"] == "p2p"}
    for r in results:
        b = base[r["model"]]
        r["saved_layer_vs_p2p"] = r["saved_layer_bytes"] / b["saved_layer_bytes"]
        r["saved_attention_vs_p2p"] = r["saved_attention_bytes"] / b["saved_attention_bytes"]
        layout = r["comm"] + (f" {r['a2a_size']}x{r['ring_size']}" if r["comm"] == "a2a+p2p" else "")
        print(
            f"{r['model']:16} {layout:14} {r['sent_bytes'] * mib:9.3f} {r['theory_bytes'] * mib:8.3f} "
            f"{r['ratio']:6.3f} {r['inter_node_bytes'] * mib:10.3f} {r['theory_inter_node_bytes'] * mib:8.3f} "
            f"{r['inter_ratio']:6.3f} {r['saved_layer_bytes'] * mib:11.3f} {r['saved_layer_vs_p2p']:6.3f} "
            f"{r['saved_attention_bytes'] * mib:10.3f} {r['saved_attention_vs_p2p']:6.3f}"
        )
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as fh:
        setup = dict(vars(args), cp=CP, dtype="bfloat16", accumulator="float32", torch=torch.__version__)
        json.dump(dict(setup=setup, per_layer=results), fh, indent=1)
    print(f"wrote {OUT}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(worker, args=(args, tmp), nprocs=CP, start_method="spawn")


if __name__ == "__main__":
    main()
