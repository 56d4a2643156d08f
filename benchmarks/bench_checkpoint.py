"""Checkpoint save and load time and bytes vs model size, at 1 rank and 4 ranks (TP=2 x DP=2), CPU.

For each model size (GPT, 4 layers, hidden 256 / 512 / 1024, vocab 32000, after one AdamW step
so the optimizer state exists):

- save: megalite.training.checkpoint.save (every rank writes its share, fsync, atomic commit),
  wall time from a barrier before to the barrier after, median of --repeats;
- load: checkpoint.load into the same layout;
- verify: the CRC-32 check of every file that precedes a run's load (all ranks, a share each);
- reshard load: the 4-rank (TP=2) checkpoint loaded by 1 rank (TP=1);
- bytes: all files of one checkpoint, and the largest file (= the busiest writer);
- baseline: torch.save of the whole model + optimizer state_dict from 1 rank into one file;
- hashes: single-core throughput of the checksums the standard library offers, on 64 MiB
  (why meta.json records CRC-32; the save computes it on the bytes as they are written);
- checksum overhead: one 256 MiB rank file written (torch.save + fsync) with and without the
  CRC-32 computed on the way, alternating, median of 2 x --repeats + 1 each.

Files go to --dir (default: a temp dir); loads then come from the page cache, so they measure
deserialisation and copying rather than the disk. Ranks are spawned gloo processes here.

    python benchmarks/bench_checkpoint.py [--hidden 256 512 1024] [--repeats 3] [--dir /fast/disk]

Writes benchmarks/results/checkpoint.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import statistics
import tempfile
import time
import zlib

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megalite import config as C
from megalite import distributed
from megalite.model import GPT
from megalite.parallel.dims import ParallelDims
from megalite.parallel.parallelize import parallelize
from megalite.training import checkpoint
from megalite.training.checkpoint import integrity
from megalite.training.checkpoint.atomic_save import _write_share
from megalite.training.optim import build_optimizer

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "checkpoint.json")
VOCAB = 32000


def build(hidden: int, tp: int):
    cfg = C.parse(
        [
            "--num-layers",
            "4",
            "--hidden-size",
            str(hidden),
            "--num-attention-heads",
            "8",
            "--seq-length",
            "64",
            "--tensor-parallel-size",
            str(tp),
            "--micro-batch-size",
            "1",
        ]
    )
    cfg.train.global_batch_size = dist.get_world_size() // tp
    dims = ParallelDims.build(cfg.parallel)
    model = parallelize(GPT(cfg.model, VOCAB), dims, cfg, torch.device("cpu"))
    opt = build_optimizer(model, cfg.train)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    opt.step()  # creates exp_avg / exp_avg_sq / step
    return cfg, dims, model, opt


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def dir_bytes(path: str) -> tuple[int, int]:
    sizes = [os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)]
    return sum(sizes), max(sizes)


def run(rank, world, store_path, root, hiddens, repeats, out):
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = measure(world, root, hiddens, repeats)
    if rank == 0:
        with open(out, "w") as fh:
            json.dump(results, fh)
    distributed.shutdown()  # after measure() returned: its models and mesh are gone


def measure(world, root, hiddens, repeats) -> list[dict]:
    results = []
    for hidden in hiddens:
        tp = 2 if world == 4 else 1
        cfg, dims, model, opt = build(hidden, tp)
        save_dir = os.path.join(root, f"h{hidden}_w{world}")
        save_s = timed(lambda: checkpoint.save(save_dir, 1, 0, model, opt, dims, cfg), repeats)
        ckpt = os.path.join(save_dir, "iter_0000001")
        load_s = timed(lambda: checkpoint.load(ckpt, model, opt, dims, cfg, log=lambda *a: None), repeats)
        meta = checkpoint.read_meta(ckpt)
        verify_s = timed(lambda: integrity.verify(ckpt, meta), repeats)
        dense = meta["tensors"]
        row = {
            "hidden": hidden,
            "world": world,
            "layout": f"TP={tp} DP={world // tp}",
            "params_m": sum(
                math.prod(e["shape"][1:]) * e.get("real", e["shape"][0])
                for k, e in dense.items()
                if k.startswith("model/")
            )
            / 1e6,
            "save_s": save_s,
            "load_s": load_s,
            "verify_s": verify_s,
        }
        row["bytes"], row["largest_file_bytes"] = dir_bytes(ckpt)
        if world == 1:
            four = os.path.join(root, f"h{hidden}_w4", "iter_0000001")
            row["reshard_load_from_tp2_s"] = timed(
                lambda: checkpoint.load(four, model, opt, dims, cfg, log=lambda *a: None), repeats
            )
            flat = os.path.join(root, f"h{hidden}_flat.pt")
            row["baseline_torch_save_s"] = timed(
                lambda: torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, flat), repeats
            )
            row["baseline_bytes"] = os.path.getsize(flat)
        results.append(row)
    return results


def hash_throughput(repeats: int) -> dict[str, float]:
    """GB/s of each standard-library checksum on one core (best of `repeats`)."""
    data = os.urandom(64 << 20)
    hashes = {
        "crc32": zlib.crc32,
        "adler32": zlib.adler32,
        "sha1": lambda b: hashlib.sha1(b).digest(),
        "md5": lambda b: hashlib.md5(b).digest(),
        "blake2b": lambda b: hashlib.blake2b(b).digest(),
    }
    out = {}
    for name, fn in hashes.items():
        best = min(_seconds(fn, data) for _ in range(repeats))
        out[name] = len(data) / best / 1e9
    return out


def _seconds(fn, data) -> float:
    t0 = time.perf_counter()
    fn(data)
    return time.perf_counter() - t0


def checksum_overhead(root: str, repeats: int, mib: int = 256) -> dict[str, float]:
    """Seconds to write one rank file of `mib` MiB, plain and with its CRC-32, alternating so
    that both see the same machine load."""
    obj = {"tensors": {f"t{i}": torch.randn(mib << 14) for i in range(16)}}  # 16 x mib/16 MiB
    path = os.path.join(root, "share.pt")

    def plain():
        with open(path, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())

    times = {"plain_s": [], "crc32_s": []}
    for _ in range(2 * repeats + 1):
        times["plain_s"].append(_seconds(lambda _: plain(), None))
        times["crc32_s"].append(_seconds(lambda _: _write_share(path, obj), None))
    out = {k: statistics.median(v) for k, v in times.items()}
    return {"mib": mib, **out, "overhead": out["crc32_s"] / out["plain_s"] - 1}


def spawn(world, root, hiddens, repeats):
    out = os.path.join(root, f"result_{world}.json")
    store = os.path.join(root, f"store_{world}")
    mp.start_processes(run, args=(world, store, root, hiddens, repeats, out), nprocs=world, start_method="spawn")
    return json.load(open(out))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where checkpoints are written (default: a temp dir)")
    a = ap.parse_args()
    root = tempfile.mkdtemp(prefix="bench-ckpt-", dir=a.dir)
    try:
        rows = spawn(4, root, a.hidden, a.repeats) + spawn(1, root, a.hidden, a.repeats)
        overhead = checksum_overhead(root, a.repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    hashes = hash_throughput(a.repeats)
    print(
        f"{'hidden':>6} {'params':>8} {'ranks':>5} {'layout':>10} {'bytes':>13} {'largest file':>13} "
        f"{'save s':>7} {'load s':>7} {'verify s':>8} {'reshard s':>9} {'torch.save s':>12}"
    )
    nan = float("nan")
    for r in sorted(rows, key=lambda r: (r["hidden"], r["world"])):
        print(
            f"{r['hidden']:>6} {r['params_m']:>7.1f}M {r['world']:>5} {r['layout']:>10} {r['bytes']:>13,} "
            f"{r['largest_file_bytes']:>13,} {r['save_s']:>7.3f} {r['load_s']:>7.3f} {r['verify_s']:>8.3f} "
            f"{r.get('reshard_load_from_tp2_s', nan):>9.3f} {r.get('baseline_torch_save_s', nan):>12.3f}"
        )
    print("checksum GB/s on one core: " + ", ".join(f"{k} {v:.2f}" for k, v in hashes.items()))
    print(
        f"writing a {overhead['mib']} MiB rank file: {overhead['plain_s']:.3f} s plain, {overhead['crc32_s']:.3f} s "
        f"with its CRC-32 ({overhead['overhead']:+.1%})"
    )
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as fh:
        json.dump(
            {
                "device": "cpu",
                "torch": torch.__version__,
                "note": "loads hit the page cache; 4 ranks share the machine's cores",
                "rows": rows,
                "checksum_gbps_one_core": hashes,
                "checksum_overhead": overhead,
            },
            fh,
            indent=1,
        )
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
