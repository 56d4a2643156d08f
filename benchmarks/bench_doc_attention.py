"""Packed documents under context parallelism: wasted work, load balance, padding, and time.

Samples are windows of ``seq`` tokens over documents in random order (a document cut by a
window edge stays one document), with document lengths from two distributions: the default
corpus (its built dataset's documents) and a log-normal with mean 2048 tokens (sigma 1).

counted  From the very plans ring attention runs (``ring_plans``, pure functions of the ids),
         at seq 32k and 128k, CP = 2, 4, 8:
         - executed / required: query-key pairs the kernels compute (a rectangle |q| x |k|, a
           causal square n(n+1)/2) over the pairs the document mask allows (sum of n(n+1)/2 per
           document). Also at kernel-tile granularity (128 x 128 tiles, as flash kernels
           work), which charges partial tiles at document edges in full. Target <= 1.10.
         - unmasked / required: the work causal attention without documents spends.
         - max / mean of the work per CP rank with zigzag chunks. Target <= 1.10. Also the best
           any reassignment of the same 2*CP chunks (two per rank) could reach: pairing chunks
           heaviest with lightest minimises the largest pair.
         - padding tokens added: what the split adds to the sample (0 by construction).
timed    One process simulates the CP=4 ranks of ring attention one after another (each rank's
         kernel calls on its zigzag pair and the K/V of every source rank; no communication),
         forward + backward (fastest of 3), 1 head, head dim 64, bf16, torch's CPU flash kernel: with documents
         (log-normal) vs without. The slowest rank's time is the step's attention time.

    python benchmarks/bench_doc_attention.py [--samples 4] [--time-seq 32768 | --time-seq 0]

Writes benchmarks/results/doc_attention.json and doc_attention.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np
import torch

from megalite.data.default_corpus import ensure_default_corpus
from megalite.data.indexed import IndexedDataset
from megalite.ops.attention import get_backend
from megalite.ops.doc_attention import run_backward, run_forward
from megalite.parallel.ring_attention import ring_plans
from megalite.parallel.zigzag import zigzag_split

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TILE = 128


def corpus_lengths() -> np.ndarray:
    prefix, _ = ensure_default_corpus(log=lambda _: None)
    ds = IndexedDataset(prefix)
    return np.array([len(ds.doc(i)) for i in range(len(ds))])


def lognormal_lengths(rng, mean: float, sigma: float, tokens: int) -> np.ndarray:
    n = int(4 * tokens / mean) + 64
    return np.maximum(1, np.round(rng.lognormal(math.log(mean) - sigma**2 / 2, sigma, n))).astype(np.int64)


def pack(rng, lengths: np.ndarray, seq: int, samples: int) -> torch.Tensor:
    """(samples, seq) document ids: windows at random offsets of the documents shuffled and
    concatenated (repeated until long enough)."""
    order = np.concatenate([rng.permutation(len(lengths)) for _ in range(1 + 2 * seq // lengths.sum())])
    stream = np.repeat(np.arange(len(order)), lengths[order])
    starts = rng.integers(0, len(stream) - seq, samples)
    return torch.from_numpy(np.stack([stream[a : a + seq] - stream[a] for a in starts]))


def pair_work(p, tile: int = 1) -> int:
    """Query-key pairs one kernel call computes, counted in ``tile`` x ``tile`` tiles."""
    nq = math.ceil((p.q.stop - p.q.start) / tile)
    if p.causal:
        return nq * (nq + 1) // 2 * tile * tile if tile > 1 else nq * (nq + 1) // 2
    return nq * math.ceil((p.k.stop - p.k.start) / tile) * tile * tile


def best_pairing_balance(ids: torch.Tensor, cp: int) -> float:
    """max / mean rank work if the 2*CP chunks were paired by work, heaviest with lightest."""
    seq = ids.shape[1]
    first = torch.ones_like(ids, dtype=torch.bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    start = torch.where(first, torch.arange(seq), 0).cummax(dim=1).values  # each token's document start
    work = (torch.arange(seq) - start + 1).sum(0).double().view(2 * cp, -1).sum(1).sort().values
    pairs = work[:cp] + work.flip(0)[:cp]
    return float(pairs.max() / pairs.mean())


def count(ids: torch.Tensor, cp: int) -> dict:
    seq = ids.shape[1]
    required = sum(
        int(n) * (int(n) + 1) // 2 for row in ids for n in torch.unique_consecutive(row, return_counts=True)[1]
    )
    per_rank, tiles, calls, empty_steps = [], 0, 0, 0
    for rank in range(cp):
        plans = ring_plans(cp, rank, seq // cp, True, ids)
        per_rank.append(sum(pair_work(p) for plan in plans for p in plan))
        tiles += sum(pair_work(p, TILE) for plan in plans for p in plan)
        calls += sum(len(plan) for plan in plans)
        empty_steps += sum(not plan for plan in plans[1:])
    padding = sum(zigzag_split(ids, 1, cp, r).shape[1] for r in range(cp)) - seq
    mean = sum(per_rank) / cp
    return {
        "executed_over_required": sum(per_rank) / required,
        "tiles_over_required": tiles / required,
        "unmasked_over_required": ids.shape[0] * seq * (seq + 1) / 2 / required,
        "max_over_mean": max(per_rank) / mean,
        "best_pairing_max_over_mean": best_pairing_balance(ids, cp),
        "padding_tokens": padding,
        "kernel_calls": calls,
        "empty_ring_steps": empty_steps,
        "rank_work": per_rank,
    }


def counted(dists: dict, samples: int, rng) -> list[dict]:
    rows = []
    for name, lengths in dists.items():
        for seq in (32768, 131072):
            batch = [pack(rng, lengths(seq), seq, 1) for _ in range(samples)]  # the same samples at every CP
            for cp in (2, 4, 8):
                per_sample = [count(ids, cp) for ids in batch]
                row = {"lengths": name, "seq": seq, "cp": cp}  # worst sample, counts summed
                for key in per_sample[0].keys() - {"rank_work"}:
                    row[key] = (sum if key in ("kernel_calls", "empty_ring_steps") else max)(s[key] for s in per_sample)
                row["ring_steps_after_first"] = samples * cp * (cp - 1)
                row["mean_max_over_mean"] = sum(s["max_over_mean"] for s in per_sample) / samples
                rows.append(row)
                print(
                    f"{name:10s} seq {seq:6d} CP={cp}: executed/required {row['executed_over_required']:.3f} "
                    f"(128-tiles {row['tiles_over_required']:.3f}), unmasked/required "
                    f"{row['unmasked_over_required']:.1f}, rank max/mean {row['max_over_mean']:.3f} "
                    f"(mean over samples {row['mean_max_over_mean']:.3f}; best chunk pairing "
                    f"{row['best_pairing_max_over_mean']:.3f}), empty ring steps "
                    f"{row['empty_ring_steps']}/{row['ring_steps_after_first']}, padding {row['padding_tokens']}"
                )
    return rows


def simulate_ring(
    ids, cp: int, seq: int, heads=1, kv_heads=1, head_dim=64, dtype=torch.bfloat16, repeats=3
) -> list[float]:
    """Seconds of forward + backward attention per rank (fastest of ``repeats``: the machine is
    shared), the ranks run one after another."""
    gen = torch.Generator().manual_seed(0)
    q, k, v, dout = (
        torch.randn(1, seq, h, head_dim, generator=gen).to(dtype) for h in (heads, kv_heads, kv_heads, heads)
    )
    backend, scale = get_backend("torch_cpu"), head_dim**-0.5
    kv = [(zigzag_split(k, 1, cp, r), zigzag_split(v, 1, cp, r)) for r in range(cp)]
    times = []
    for rank in range(cp):
        ql, dl = zigzag_split(q, 1, cp, rank), zigzag_split(dout, 1, cp, rank)
        plans = ring_plans(cp, rank, seq // cp, True, ids)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            out, lse = run_forward(backend, ql, *kv[rank], plans[0], scale)
            for step in range(1, cp):
                run_forward(backend, ql, *kv[(rank - step) % cp], plans[step], scale, acc=(out, lse))
            out = out.to(dtype)
            dq = torch.zeros_like(ql, dtype=torch.float32)
            for step in range(cp):
                kr, vr = kv[(rank - step) % cp]
                dk, dv = torch.zeros_like(kr, dtype=torch.float32), torch.zeros_like(vr, dtype=torch.float32)
                run_backward(backend, dl, ql, kr, vr, out, lse, plans[step], scale, dq, dk, dv)
            best = min(best, time.perf_counter() - start)
        times.append(best)
    return times


def timed(lengths, rng, seq=32768, cp=4) -> dict:
    ids = pack(rng, lengths(seq), seq, 1)
    masked = simulate_ring(ids, cp, seq)
    unmasked = simulate_ring(None, cp, seq)
    c = count(ids, cp)
    res = {
        "seq": seq,
        "cp": cp,
        "masked_rank_s": masked,
        "unmasked_rank_s": unmasked,
        "masked_rank_work": c["rank_work"],
        "speedup_slowest_rank": max(unmasked) / max(masked),
        # the unmasked ranks are balanced: each does 1/CP of seq(seq+1)/2
        "work_ratio_slowest_rank": seq * (seq + 1) / 2 / cp / max(c["rank_work"]),
    }
    print(
        f"timed seq {seq} CP={cp} (simulated ranks, fwd+bwd): masked slowest rank {max(masked):.2f}s "
        f"{[round(t, 2) for t in masked]}, unmasked {max(unmasked):.2f}s {[round(t, 2) for t in unmasked]}: "
        f"{res['speedup_slowest_rank']:.1f}x faster; the slowest rank's work shrinks "
        f"{res['work_ratio_slowest_rank']:.1f}x"
    )
    return res


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(13, 4))
    labels = [f"{r['lengths']}\n{r['seq'] // 1024}k CP{r['cp']}" for r in rows]
    x = np.arange(len(rows))
    ax[0].bar(x - 0.2, [r["executed_over_required"] for r in rows], 0.4, label="token pairs")
    ax[0].bar(x + 0.2, [r["tiles_over_required"] for r in rows], 0.4, label=f"{TILE}x{TILE} tiles")
    ax[0].set_title("attention work executed / required by the document mask")
    ax[1].bar(x - 0.27, [r["max_over_mean"] for r in rows], 0.27, label="zigzag, worst sample")
    ax[1].bar(x, [r["mean_max_over_mean"] for r in rows], 0.27, label="zigzag, mean over samples")
    ax[1].bar(x + 0.27, [r["best_pairing_max_over_mean"] for r in rows], 0.27, label="best chunk pairing, worst")
    ax[1].set_title("attention work max / mean over CP ranks")
    for a in ax:
        a.axhline(1.10, color="k", ls="--", lw=1)
        a.set_xticks(x, labels, fontsize=6)
        a.set_ylim(0, 1.3 * max(b.get_height() for b in a.patches))
        a.legend(loc="upper left", ncol=3, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4, help="samples per (lengths, seq, CP)")
    parser.add_argument("--time-seq", type=int, default=32768, help="sequence of the timed simulation (0: skip)")
    args = parser.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    corpus = corpus_lengths()
    print(f"default corpus: {len(corpus)} documents, mean {corpus.mean():.0f} tokens, median {np.median(corpus):.0f}")
    dists = {"corpus": lambda seq: corpus, "lognormal": lambda seq: lognormal_lengths(rng, 2048, 1.0, seq)}
    res = {"tile": TILE, "samples": args.samples, "counted": counted(dists, args.samples, rng)}
    if args.time_seq:
        res["timed"] = timed(dists["lognormal"], rng, seq=args.time_seq)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "doc_attention.json"), "w") as f:
        json.dump(res, f, indent=1)
    plot(res["counted"], os.path.join(RESULTS, "doc_attention.png"))
    print("wrote benchmarks/results/doc_attention.json and doc_attention.png")


if __name__ == "__main__":
    main()
