"""Scaling: predicted GPU-cluster curves, and measured CP / TP scaling on this machine.

predict   Llama-3-8B and 70B at 32k to 1M tokens per sequence on 8 to 1024 H100s (8 per node):
          the planner's best layout at each point (TP, CP, DP, CP comm type, recompute searched;
          global batch one sequence per 8 GPUs; fused loss, FSDP2 fully sharded with bf16
          parameters, as issues 13 and 14 specify), its MFU and peak memory per GPU; the published
          Megatron-LM weak-scaling and Korthikanti et al. points (their MFU vs GPUs) overlaid.
measure   On this machine (CPU, gloo, pretrain.py): CP weak scaling (sequence proportional to
          CP), CP strong scaling (fixed sequence) and TP strong scaling, measured step time and
          peak memory per rank next to the planner's prediction (--hardware, default cpu). Needs
          a quiet machine; the load average is recorded.

    python benchmarks/scaling.py [predict] [measure] [--hardware cpu] [--quick]

Writes benchmarks/results/scaling.json and scaling.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile

from megalite import config as C
from megalite.plan import hardware, published
from megalite.plan.options import job_from
from megalite.plan.presets import MODELS
from megalite.plan.search import rank

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from plan_vs_measured import predicted, run  # noqa: E402  the same runner and prediction

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SEQS = (32768, 131072, 524288, 1048576)
GPUS = (8, 16, 32, 64, 128, 256, 512, 1024)


def best(model: str, seq: int, gpus: int, hw) -> dict | None:
    cfg = C.parse([*MODELS[model], "--seq-length", str(seq), "--micro-batch-size", "1",
                   "--global-batch-size", str(max(1, gpus // 8))])  # fmt: skip
    # issue 13 and 14's options as specified (fused loss, FSDP2 with bf16 parameters, fully sharded)
    job = dataclasses.replace(
        job_from(cfg, cfg.model.vocab_size), loss_chunk=1024, fsdp=True, precision="bf16", sharding="optim_grads_params"
    )
    fits = [p for p in rank(job, hw, gpus, 8, {"pp": 1}) if p.fits]
    return fits[0].as_dict() if fits else None


def predict_curves(hw) -> dict:
    curves = {}
    for model in ("llama3-8b", "llama3-70b"):
        for seq in SEQS:
            points = []
            for gpus in GPUS:
                b = best(model, seq, gpus, hw)
                if b:
                    points.append(
                        {"gpus": gpus, **{k: b[k] for k in ("tp", "cp", "dp", "recompute", "mfu", "mem_gib")}}
                    )
            curves[f"{model} {seq // 1024}k"] = points
            print(model, seq, [(p["gpus"], round(100 * p["mfu"], 1), round(p["mem_gib"], 1)) for p in points])
    rows = published.rows(hardware.load("h100-sxm"), hardware.load("a100-80gb"))
    pub = [
        {"name": r["row"], "gpus": g, "mfu": r["published"] / 989.0}
        for r, (_, _, _, _, g, _, _) in zip(rows, published.MEGATRON_WEAK_SCALING)
    ]
    return {"curves": curves, "published_megatron_h100": pub}


# name, ranks, flags: CP weak (sequence x CP), CP strong (fixed sequence), TP strong
MEASURED = [
    ("CP weak", 1, ["--seq-length", "4096"]),
    ("CP weak", 2, ["--seq-length", "8192", "--context-parallel-size", "2"]),
    ("CP weak", 4, ["--seq-length", "16384", "--context-parallel-size", "4"]),
    ("CP strong", 1, ["--seq-length", "8192"]),
    ("CP strong", 2, ["--seq-length", "8192", "--context-parallel-size", "2"]),
    ("CP strong", 4, ["--seq-length", "8192", "--context-parallel-size", "4"]),
    ("TP strong", 1, ["--seq-length", "2048", "--micro-batch-size", "2"]),
    ("TP strong", 2, ["--seq-length", "2048", "--micro-batch-size", "2", "--tensor-parallel-size", "2",
                      "--sequence-parallel"]),
    ("TP strong", 4, ["--seq-length", "2048", "--micro-batch-size", "2", "--tensor-parallel-size", "4",
                      "--sequence-parallel"]),
]  # fmt: skip


def measure(hw, quick: bool) -> dict:
    from megalite.data.default_corpus import ensure_default_corpus
    from megalite.data.tokenizer import Tokenizer

    vocab = Tokenizer(ensure_default_corpus(log=lambda *a: None)[1]).vocab_size
    load = os.getloadavg()[0]
    if load > 2.5:
        print(f"warning: load average {load:.1f}: timings are not meaningful on a busy machine")
    rows = []
    for name, ranks, flags in MEASURED:
        if quick:
            flags = [("256" if f.isdigit() and int(f) >= 1024 else f) for f in flags]
        log_dir = tempfile.mkdtemp(prefix="scaling_")
        try:
            recs = run(ranks, flags, 2 if quick else 4, log_dir)
        finally:
            shutil.rmtree(log_dir, ignore_errors=True)
        steady = [r["step_time"] for r in recs[1:]] or [recs[0]["step_time"]]
        pred = predicted(ranks, flags, vocab, hw)
        row = {"series": name, "ranks": ranks, "flags": flags, "step_time_s": sum(steady) / len(steady),
               "mem_gib": max(r["mem_gib"] for r in recs), "predicted": pred}  # fmt: skip
        rows.append(row)
        print(f"{name:<10} {ranks} ranks: step {row['step_time_s']:.3f} s (pred {pred['step_time_s']:.3f}), "
              f"mem {row['mem_gib']:.3f} GiB (pred {pred['mem_gib']:.3f})")  # fmt: skip
    return {"load_average": [load, os.getloadavg()[0]], "hardware": hw.name, "rows": rows}


def plot(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if "measured" in res else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.5))
    if "predicted" in res:
        pred = res["predicted"]
        for label, pts in pred["curves"].items():
            if pts:
                xs = [p["gpus"] for p in pts]
                axes[0].plot(xs, [100 * p["mfu"] for p in pts], marker="o", label=label)
                axes[1].plot(xs, [p["mem_gib"] for p in pts], marker="o", label=label)
        pub = pred["published_megatron_h100"]
        axes[0].scatter([p["gpus"] for p in pub], [100 * p["mfu"] for p in pub], marker="*", s=80, c="k",
                        label="Megatron-LM published (other models)")  # fmt: skip
        for ax, ylabel in ((axes[0], "best layout's MFU (%)"), (axes[1], "peak memory per GPU (GiB)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("H100 GPUs")
            ax.set_ylabel(ylabel)
            ax.legend(fontsize=6)
        axes[0].set_title("predicted: Llama-3 on H100 (8 per node)")
    if "measured" in res:
        ax = axes[-1]
        for series in ("CP weak", "CP strong", "TP strong"):
            rows = [r for r in res["measured"]["rows"] if r["series"] == series]
            (line,) = ax.plot([r["ranks"] for r in rows], [r["step_time_s"] for r in rows], marker="o", label=series)
            ax.plot([r["ranks"] for r in rows], [r["predicted"]["step_time_s"] for r in rows], "--",
                    color=line.get_color(), label=f"{series} predicted")  # fmt: skip
        ax.set_xlabel("ranks (CPU, gloo)")
        ax.set_ylabel("step time (s)")
        ax.set_title("measured vs predicted, this machine")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("parts", nargs="*", default=["predict"], choices=[[], "predict", "measure"])
    ap.add_argument("--hardware", default="cpu", help="for the measured part")
    ap.add_argument("--quick", action="store_true", help="tiny runs to check the script (nothing saved)")
    args = ap.parse_args()
    res = {}
    if "predict" in args.parts:
        res["predicted"] = predict_curves(hardware.load("h100-sxm"))
    if "measure" in args.parts:
        res["measured"] = measure(hardware.load(args.hardware), args.quick)
    if args.quick:
        return
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, "scaling.json")
    with open(path, "w") as fh:
        json.dump(res, fh, indent=1)
    plot(res, os.path.join(RESULTS, "scaling.png"))
    print(f"wrote {path} and scaling.png")


if __name__ == "__main__":
    main()
