"""Planner predictions against pretrain.py runs on this machine.

Each layout runs through pretrain.py (torchrun, gloo, CPU; DP / TP+SP / CP p2p and a2a,
recompute off / selective / full, seq 1k-32k, 1-4 ranks) for a few iterations; the measured step
time is the mean after the first iteration, the measured peak memory rank 0's peak RSS (what
pretrain.py logs as mem). The prediction uses only the hardware file (--hardware, default the
`cpu` preset written by `megalite-plan --calibrate` from microbenchmarks), never these runs.
Targets: step time within 20%, peak memory within 10%.

Timings need a quiet machine: the load average is recorded, and a warning printed above 2.5.

    python benchmarks/plan_vs_measured.py [--hardware FILE] [--iters 4] [--only NAME ...] [--quick]
    python benchmarks/plan_vs_measured.py --from-saved   # re-predict the saved measurements (seconds)

Writes benchmarks/results/plan_vs_measured.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

from megalite import config as C
from megalite.data.default_corpus import ensure_default_corpus
from megalite.data.tokenizer import Tokenizer
from megalite.plan import hardware
from megalite.plan.options import job_from
from megalite.plan.search import predict
from megalite.plan.spec import Layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
MODEL = ["--num-layers", "2", "--hidden-size", "128", "--num-attention-heads", "4", "--micro-batch-size", "1"]

# name, ranks, flags
LAYOUTS = [
    ("1 rank, 1k", 1, ["--seq-length", "1024", "--micro-batch-size", "4"]),
    ("1 rank, 4k, full recompute", 1, ["--seq-length", "4096", "--recompute-granularity", "full"]),
    ("DP2, 2k", 2, ["--seq-length", "2048", "--micro-batch-size", "2"]),
    ("TP2+SP, 2k", 2, ["--seq-length", "2048", "--tensor-parallel-size", "2", "--sequence-parallel"]),
    ("CP2 p2p, 8k", 2, ["--seq-length", "8192", "--context-parallel-size", "2"]),
    ("TP2 DP2, 1k, selective", 4, ["--seq-length", "1024", "--tensor-parallel-size", "2",
                                   "--recompute-granularity", "selective"]),
    ("CP2 TP2+SP, 8k, selective", 4, ["--seq-length", "8192", "--context-parallel-size", "2",
                                      "--tensor-parallel-size", "2", "--sequence-parallel",
                                      "--recompute-granularity", "selective"]),
    ("CP4 a2a, 16k", 4, ["--seq-length", "16384", "--context-parallel-size", "4", "--cp-comm-type", "a2a"]),
    ("CP4 p2p, 32k, full recompute", 4, ["--seq-length", "32768", "--context-parallel-size", "4",
                                         "--recompute-granularity", "full"]),
]  # fmt: skip


def run(ranks: int, flags: list[str], iters: int, log_dir: str) -> list[dict]:
    common = [*MODEL, *flags, "--train-iters", str(iters), "--eval-interval", "0", "--log-dir", log_dir]
    if ranks == 1:
        cmd = [sys.executable, os.path.join(ROOT, "pretrain.py"), *common]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
        cmd = [*launcher, os.path.join(ROOT, "pretrain.py"), *common]
    env = {**os.environ, "PYTHONPATH": ROOT, "WANDB_MODE": "disabled"}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with open(os.path.join(log_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def predicted(ranks: int, flags: list[str], vocab: int, hw) -> dict:
    cfg = C.parse([*MODEL, *flags])
    p = cfg.parallel
    dp = ranks // (p.tensor_parallel_size * p.context_parallel_size)
    cfg.train.global_batch_size = cfg.train.global_batch_size or cfg.train.micro_batch_size * dp
    sp = p.sequence_parallel and p.tensor_parallel_size > 1
    lay = Layout(tp=p.tensor_parallel_size, cp=p.context_parallel_size, dp=dp, sp=sp, cp_comm=p.cp_comm_type)
    pred = predict(job_from(cfg, vocab), lay, hw, ranks)
    return {"step_time_s": pred.step_time_s, "mem_gib": pred.mem_gib, "breakdown": pred.as_dict()}


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, unit, band in ((axes[0], "step_time_s", "s", 0.2), (axes[1], "mem_gib", "GiB", 0.1)):
        xs = [r["measured"][key] for r in rows]
        ys = [r["predicted"][key] for r in rows]
        lo, hi = min(xs + ys) * 0.8, max(xs + ys) * 1.2
        ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
        ax.fill_between([lo, hi], [lo * (1 - band), hi * (1 - band)], [lo * (1 + band), hi * (1 + band)], alpha=0.15)
        ax.scatter(xs, ys)
        for r, x, y in zip(rows, xs, ys):
            ax.annotate(r["name"], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"measured ({unit})")
        ax.set_ylabel(f"predicted ({unit})")
        ax.set_title(f"{key} (band: ±{band:.0%})")
    fig.suptitle("megalite-plan vs pretrain.py on this machine (CPU, gloo)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hardware", default="cpu")
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--only", nargs="*", help="run only layouts whose name contains one of these")
    ap.add_argument("--quick", action="store_true", help="short sequences, to check the script (numbers not saved)")
    ap.add_argument(
        "--from-saved",
        action="store_true",
        help="re-predict the measured rows of the saved JSON without running pretrain.py (after a model change)",
    )
    args = ap.parse_args()
    hw = hardware.load(args.hardware)
    vocab = Tokenizer(ensure_default_corpus(log=lambda *a: None)[1]).vocab_size
    path = os.path.join(RESULTS, "plan_vs_measured.json")
    if args.from_saved:
        with open(path) as fh:
            saved = json.load(fh)
        rows = [_row(r["name"], r["ranks"], r["flags"], r["measured"], vocab, hw) for r in saved["rows"]]
        _save({**saved, "hardware": hw.name, "hardware_notes": hw.notes, "rows": rows}, path)
        return
    load_start = os.getloadavg()[0]
    if load_start > 2.5:
        print(f"warning: load average {load_start:.1f}: timings are not meaningful on a busy machine")
    rows = []
    for name, ranks, flags in LAYOUTS:
        if args.only and not any(o in name for o in args.only):
            continue
        if args.quick:
            flags = [("256" if f.isdigit() and int(f) >= 1024 else f) for f in flags]
        log_dir = tempfile.mkdtemp(prefix="plan_vs_measured_")
        try:
            recs = run(ranks, flags, args.iters, log_dir)
        finally:
            shutil.rmtree(log_dir, ignore_errors=True)
        steady = [r["step_time"] for r in recs[1:]] or [recs[0]["step_time"]]
        measured = {"step_time_s": sum(steady) / len(steady), "mem_gib": max(r["mem_gib"] for r in recs)}
        rows.append(_row(name, ranks, flags, measured, vocab, hw))
    if args.quick or not rows:
        return
    out = {
        "hardware": hw.name,
        "hardware_notes": hw.notes,
        "load_average": [load_start, os.getloadavg()[0]],
        "targets": {"step_time": 0.2, "memory": 0.1},
        "rows": rows,
    }
    _save(out, path)


def _row(name, ranks, flags, measured, vocab, hw) -> dict:
    pred = predicted(ranks, flags, vocab, hw)
    err = {k: pred[k] / measured[k] - 1 for k in ("step_time_s", "mem_gib")}
    print(
        f"{name:<32} step {measured['step_time_s']:8.3f} s pred {pred['step_time_s']:8.3f} "
        f"({err['step_time_s']:+6.1%}) | mem {measured['mem_gib']:6.3f} GiB pred {pred['mem_gib']:6.3f} "
        f"({err['mem_gib']:+6.1%})",
        flush=True,
    )
    return {"name": name, "ranks": ranks, "flags": flags, "measured": measured, "predicted": pred, "error": err}


def _save(out, path):
    os.makedirs(RESULTS, exist_ok=True)
    with open(path, "w") as fh:
        json.dump(out, fh, indent=1)
    try:
        plot(out["rows"], os.path.join(RESULTS, "plan_vs_measured.png"))
    except ImportError:
        print("matplotlib is not installed: no plan_vs_measured.png")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
