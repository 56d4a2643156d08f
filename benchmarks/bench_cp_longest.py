"""Longest sequence one training step fits with context parallel on this machine (CP=4, CPU).

Runs the real training entry (megalite.training.main) for one optimizer step on the embedded
default corpus, in CP ranks spawned here (gloo, one thread each), for each --seq given:
one sequence per step (micro batch 1), a small Llama-style model (RoPE, RMSNorm, SwiGLU, GQA).
Records per rank: wall time of the whole run, the step time the loop logged (rank 0) and peak
resident memory (ru_maxrss, which includes the Python + torch process itself: start_rss_gib).
Attention time grows with seq^2 while memory grows with seq (flash kernels, zigzag shard), so
run two or more lengths to see both slopes; results are in benchmarks/results/cp_longest.json
and the README's benchmark table.

    python benchmarks/bench_cp_longest.py [--seq 65536 131072] [--cp 4]

Writes benchmarks/results/cp_longest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megalite import distributed

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def worker(rank, world, argv, tmp):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        store=dist.FileStore(os.path.join(tmp, "store"), world),
        rank=rank,
        world_size=world,
        timeout=timedelta(hours=2),
    )
    from megalite.training.main import main

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    main(argv)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open(os.path.join(tmp, f"rank{rank}.json"), "w") as fh:
        json.dump(dict(rank=rank, wall_s=wall, peak_rss_gib=peak / 2**20, start_rss_gib=base / 2**20), fh)
    dist.barrier()
    distributed.shutdown()


def run(seq, a):
    argv = [
        "--context-parallel-size",
        str(a.cp),
        "--seq-length",
        str(seq),
        "--micro-batch-size",
        "1",
        "--train-iters",
        "1",
        "--eval-iters",
        "0",
        "--num-layers",
        str(a.layers),
        "--hidden-size",
        str(a.hidden),
        "--num-attention-heads",
        str(a.heads),
        "--group-query-attention",
        "--num-query-groups",
        str(a.heads // 2),
        "--swiglu",
        "--normalization",
        "RMSNorm",
        "--cp-comm-type",
        "p2p",
        "--device",
        "cpu",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        argv += ["--log-dir", tmp]
        mp.spawn(worker, args=(a.cp, argv, tmp), nprocs=a.cp)
        ranks = [json.load(open(os.path.join(tmp, f"rank{r}.json"))) for r in range(a.cp)]
        step = json.loads(open(os.path.join(tmp, "metrics.jsonl")).readline())
    return dict(
        seq=seq,
        cp=a.cp,
        tokens_per_rank=seq // a.cp,
        step_time_s=step["step_time"],
        loss=step["loss"],
        per_rank=ranks,
        max_peak_rss_gib=max(r["peak_rss_gib"] for r in ranks),
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, nargs="+", default=[65536])
    p.add_argument("--cp", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    a = p.parse_args()
    out = os.path.join(RESULTS, "cp_longest.json")
    done = json.load(open(out))["runs"] if os.path.exists(out) else []
    for seq in a.seq:
        r = run(seq, a)
        print(
            f"seq {seq} CP={a.cp}: one step {r['step_time_s']:.1f} s, loss {r['loss']:.3f}; peak RSS per rank "
            + ", ".join(f"{x['peak_rss_gib']:.2f}" for x in r["per_rank"])
            + " GiB",
            flush=True,
        )
        done = [d for d in done if (d["seq"], d["cp"]) != (seq, a.cp)] + [r]
    os.makedirs(RESULTS, exist_ok=True)
    with open(out, "w") as fh:
        json.dump(
            dict(
                setup=dict(
                    layers=a.layers,
                    hidden=a.hidden,
                    heads=a.heads,
                    kv_heads=a.heads // 2,
                    torch=torch.__version__,
                    machine="2 cores, 24 GiB, gloo, 1 thread per rank",
                ),
                runs=sorted(done, key=lambda d: (d["cp"], d["seq"])),
            ),
            fh,
            indent=1,
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
