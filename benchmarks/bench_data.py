"""Data pipeline at corpus scale: preprocessing throughput, dataset start-up, time waiting for data.

- preprocess: tokens/s of ``megalite.data.preprocess`` with 1 and 2 workers on a JSON-lines
  corpus made of the standard library's sources (a document per file, repeated to --mb MB), a
  2048-piece tokenizer; the two outputs are compared byte for byte. Also the CPU seconds of the
  main process (reading, writing) and of the workers, and from them the speedup 2 workers give
  when 2 cores are free (the wall-time speedup needs an idle machine).
- startup: a synthetic 10B-token, 10M-document dataset (a sparse 20 GB .bin, every token 0 = the
  EOD id, and a real 120 MB .idx) in --dir; a fresh process builds the train/valid datasets as
  pretrain does (``build_blends``) and reads the first global batch (16 x 4096 tokens), then
  one from the next epoch. Reports wall seconds, CPU seconds of the process (what the wall time
  is on an idle machine, as the work is single-threaded; the wall time suffers when the machine
  is shared) and resident memory (anonymous and file-backed) added.
- prefetch: pretrain.py on one CPU rank, tiny model (2 layers, hidden 64) at seq 8192, batch 1;
  ``data_wait_s / step_time`` from metrics.jsonl over steps 2.. (step 1 has nothing prefetched),
  with the background worker and without.

    python benchmarks/bench_data.py [--only preprocess startup prefetch] [--mb 40] [--dir /tmp/megalite-bench-data]

Writes benchmarks/results/data.json (sections not run keep their saved results).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import resource
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "benchmarks", "results", "data.json")
sys.path.insert(0, ROOT)


def _load_avg() -> float:
    return round(os.getloadavg()[0], 1)


def bench_preprocess(work: str, mb: int) -> dict:
    from megalite.data.preprocess import preprocess
    from megalite.data.tokenizer import train_tokenizer

    src = sysconfig.get_paths()["stdlib"]
    files = sorted(os.path.join(src, f) for f in os.listdir(src) if f.endswith(".py"))
    docs = [open(f, encoding="utf-8", errors="replace").read() for f in files]
    corpus = os.path.join(work, "corpus.jsonl")
    with open(corpus, "w") as out:
        written = 0
        while written < mb * 1e6:
            for d in docs:
                line = json.dumps({"text": d}) + "\n"
                out.write(line)
                written += len(line)
    sample = os.path.join(work, "sample.txt")
    with open(sample, "w") as out:
        out.write("".join(docs[:80]))
    tok = train_tokenizer([sample], os.path.join(work, "tok"), 2048)
    res = {"input_mb": round(os.path.getsize(corpus) / 1e6, 1), "load_avg_before": _load_avg()}
    for n in (1, 2):
        main0, kids0 = time.process_time(), resource.getrusage(resource.RUSAGE_CHILDREN)
        stats = preprocess([corpus], tok, os.path.join(work, f"w{n}"), workers=n, log=lambda *a: None)
        kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        main_cpu = time.process_time() - main0
        worker_cpu = (kids1.ru_utime + kids1.ru_stime) - (kids0.ru_utime + kids0.ru_stime) if n > 1 else main_cpu
        res[f"workers_{n}"] = {
            "seconds": round(stats["seconds"], 2),
            "tokens_per_s": round(stats["tokens"] / stats["seconds"]),
            "mb_per_s": round(res["input_mb"] / stats["seconds"], 2),
            "main_cpu_s": round(main_cpu, 2),
            "worker_cpu_s": round(worker_cpu, 2),
        }
        print(f"preprocess --workers {n}: {res[f'workers_{n}']}", flush=True)
    res["speedup_2_vs_1"] = round(res["workers_2"]["tokens_per_s"] / res["workers_1"]["tokens_per_s"], 2)
    # What 2 workers give on 2 idle cores, from CPU time (wall time is set by the load on a shared
    # machine): the work of the 1-worker run over the busier of the reader and the two workers.
    w1, w2 = res["workers_1"], res["workers_2"]
    res["cpu_bound_speedup_2_vs_1"] = round(w1["main_cpu_s"] / max(w2["main_cpu_s"], w2["worker_cpu_s"] / 2), 2)
    res["identical"] = all(
        filecmp.cmp(os.path.join(work, "w1" + e), os.path.join(work, "w2" + e), shallow=False) for e in (".bin", ".idx")
    )
    res["load_avg_after"] = _load_avg()
    return res


N_DOCS, N_TOKENS = 10_000_000, 10_000_000_000


def make_big(prefix: str) -> None:
    """The synthetic 10B-token dataset (kept in --dir for later runs)."""
    from megalite.data import indexed

    if os.path.exists(prefix + ".idx"):
        return
    rng = np.random.default_rng(0)
    sizes = rng.integers(2, 2 * N_TOKENS // N_DOCS - 1, N_DOCS).astype(np.int64)  # mean ~1000 tokens
    diff = int(N_TOKENS - sizes.sum())
    sizes[: abs(diff)] += np.sign(diff)
    offsets = np.zeros(N_DOCS, np.int64)
    np.cumsum(sizes[:-1], out=offsets[1:])
    with open(prefix + ".bin", "wb") as f:
        f.truncate(N_TOKENS * 2)  # sparse: reads as zeros
    with open(prefix + ".idx.tmp", "wb") as f:
        f.write(indexed.HEADERS[2].pack(indexed.MAGIC, 2, 1, 32000, N_DOCS, N_TOKENS, bytes(16)))
        f.write(offsets.tobytes())
        f.write(sizes.astype(np.int32).tobytes())
    os.replace(prefix + ".idx.tmp", prefix + ".idx")


_STARTUP = r"""
import json, sys, time
from types import SimpleNamespace
def status():
    out = {}
    for line in open("/proc/self/status"):
        key = line.split(":")[0]
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(line.split()[1]) / 2**20
    return out
import numpy, torch  # imported before the baseline
from megalite.data.blend import build_blends
base = status()
c0, t0 = time.process_time(), time.perf_counter()
flags = SimpleNamespace(data_path=[sys.argv[1]], train_data_path=None, valid_data_path=None, split="969,30,1")
train, valid = build_blends(flags, None, 4096, 1234, 0, 16)
t1 = time.perf_counter()
batch = [train[i] for i in range(16)] + [valid[i] for i in range(16)]
t2, c2 = time.perf_counter(), time.process_time()
first = status()
nxt = [train[i] for i in range(len(train), len(train) + 16)]
t3, c3 = time.perf_counter(), time.process_time()
end = status()
gib = lambda a, b, k: round(a[k] - b[k], 3)
print(json.dumps({
    "build_s": round(t1 - t0, 2), "first_batch_s": round(t2 - t1, 2), "startup_s": round(t2 - t0, 2),
    "startup_cpu_s": round(c2 - c0, 2),
    "next_epoch_batch_s": round(t3 - t2, 2),
    "next_epoch_batch_cpu_s": round(c3 - c2, 2),
    "rss_added_gib": gib(first, base, "VmRSS"), "anon_added_gib": gib(first, base, "RssAnon"),
    "file_added_gib": gib(first, base, "RssFile"), "peak_added_gib": gib(first, base, "VmHWM"),
    "rss_added_after_epoch_2_gib": gib(end, base, "VmRSS"), "peak_added_after_epoch_2_gib": gib(end, base, "VmHWM"),
}))
"""


def bench_startup(work: str) -> dict:
    prefix = os.path.join(work, "big")
    t0 = time.perf_counter()
    make_big(prefix)
    made = time.perf_counter() - t0
    load = _load_avg()
    out = subprocess.run(
        [sys.executable, "-c", _STARTUP, prefix],
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res.update(documents=N_DOCS, tokens=N_TOKENS, seq_length=4096, make_dataset_s=round(made, 1), load_avg=load)
    print(f"start-up at 10B tokens / 10M documents: {res}", flush=True)
    return res


def bench_prefetch(work: str, iters: int) -> dict:
    res = {"seq_length": 8192, "load_avg": _load_avg()}
    for name, extra in (("prefetch", []), ("no_prefetch", ["--no-data-prefetch"])):
        log_dir = os.path.join(work, name)
        shutil.rmtree(log_dir, ignore_errors=True)  # metrics.jsonl appends
        cmd = [sys.executable, os.path.join(ROOT, "pretrain.py"), "--num-layers", "2", "--hidden-size", "64"]
        cmd += ["--num-attention-heads", "4", "--seq-length", "8192", "--micro-batch-size", "1"]
        cmd += ["--train-iters", str(iters), "--eval-iters", "0", "--log-dir", log_dir, "--device", "cpu", *extra]
        subprocess.run(cmd, check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=ROOT))
        with open(os.path.join(log_dir, "metrics.jsonl")) as fh:
            recs = [json.loads(line) for line in fh][1:]  # step 1: nothing could be prefetched yet
        wait, step = sum(r["data_wait_s"] for r in recs), sum(r["step_time"] for r in recs)
        res[name] = {
            "steps": len(recs),
            "mean_step_s": round(step / len(recs), 3),
            "mean_data_wait_ms": round(wait / len(recs) * 1e3, 3),
            "wait_fraction": float(f"{wait / step:.3g}"),
        }
        print(f"{name}: {res[name]}", flush=True)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", default=["preprocess", "startup", "prefetch"])
    p.add_argument("--mb", type=int, default=40, help="preprocess input size")
    p.add_argument("--iters", type=int, default=6, help="prefetch: training steps per run")
    p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "megalite-bench-data"))
    args = p.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    results = json.load(open(OUT)) if os.path.exists(OUT) else {}
    results["machine"] = f"{os.cpu_count()} CPUs, shared (see load_avg per section)"
    for name in args.only:
        if name == "preprocess":
            results[name] = bench_preprocess(args.dir, args.mb)
        elif name == "startup":
            results[name] = bench_startup(args.dir)
        elif name == "prefetch":
            results[name] = bench_prefetch(args.dir, args.iters)
        os.makedirs(os.path.dirname(OUT), exist_ok=True)
        with open(OUT, "w") as fh:
            json.dump(results, fh, indent=1)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
