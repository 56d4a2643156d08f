"""`megalite-plan`: rank TP/CP/DP/PP layouts for a model, sequence and cluster.

Model and training flags are pretrain.py's own (parsed by megalite.config, --config included);
a preset name may come first. Layout flags given are fixed, the others searched.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from .. import config as C
from . import hardware
from .options import MODELLED, add_planner_flags, cfg_value_or_flag, job_from, pretrain_flags
from .presets import MODELS
from .search import rank
from .spec import Job


def _planner_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "megalite-plan",
        allow_abbrev=False,  # --num-layers must reach pretrain.py's parser, not match a planner flag
        description="Predict step time and memory of megalite layouts; pretrain.py flags describe the model.",
        epilog="presets: " + ", ".join(MODELS) + " (as the first argument)",
    )
    p.add_argument("--gpus", type=int, default=8, help="ranks in all")
    p.add_argument("--gpus-per-node", type=int, default=8, help="ranks per node (TP stays inside one)")
    p.add_argument("--hardware", default="h100-sxm", help=f"preset ({', '.join(hardware.presets())}) or JSON file")
    p.add_argument("--mean-document-length", type=float, help="mean document length under --reset-attention-mask")
    p.add_argument("--pipeline-parallel-size", type=int, help="fix PP (modelled only: megalite has no PP)")
    p.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, help="fix the interleaving")
    p.add_argument("--json", action="store_true", help="print the ranked layouts as JSON")
    p.add_argument("--top", type=int, default=10, help="rows of the table")
    p.add_argument("--calibrate", metavar="OUT.json", help="measure this machine and write a hardware file")
    add_planner_flags(p)
    return p


def _split_preset(argv: list[str]) -> list[str]:
    if argv and not argv[0].startswith("-"):
        if argv[0] not in MODELS:
            raise SystemExit(f"megalite-plan: unknown preset {argv[0]!r}; presets: {', '.join(MODELS)}")
        return MODELS[argv[0]] + argv[1:]
    return argv


def build_job(cfg: C.Config, ns: argparse.Namespace) -> Job:
    if cfg.model.vocab_size is None:
        raise C.ConfigError("give --vocab-size (the planner has no tokenizer to read it from)")
    if cfg_value_or_flag(cfg, ns, "reset_attention_mask") and not ns.mean_document_length:
        raise C.ConfigError("--reset-attention-mask needs --mean-document-length (tokens) to count attention")
    return job_from(cfg, cfg.model.vocab_size, ns, ns.mean_document_length)


LAYOUT_DESTS = {
    "tensor_parallel_size",
    "context_parallel_size",
    "sequence_parallel",
    "cp_comm_type",
    "recompute_granularity",
    "hierarchical_context_parallel_sizes",
}


def _user_flags(argv: list[str]) -> list[str]:
    """pretrain.py flags of ``argv`` (a preset's then the user's), each flag once (the last
    given wins, as when parsing), the layout's own flags left out."""
    actions = C.build_parser()._option_string_actions
    groups, i = {}, 0
    while i < len(argv):
        action = actions.get(argv[i].split("=")[0])
        width = 0 if action is None or action.nargs == 0 or "=" in argv[i] else (action.nargs or 1)
        if action is not None and action.dest not in LAYOUT_DESTS:
            groups.pop(action.dest, None)
            groups[action.dest] = argv[i : i + 1 + width]
        i += 1 + width
    return [a for group in groups.values() for a in group]


def command(pred, model_argv: list[str], gpus: int, gpus_per_node: int) -> str:
    """The pretrain.py command of a runnable (PP = 1) prediction: the user's flags, then the layout."""
    lay, job = pred.layout, pred.job
    flags = ["--tensor-parallel-size", str(lay.tp), "--context-parallel-size", str(lay.cp)]
    if lay.sp:
        flags.append("--sequence-parallel")
    if lay.cp > 1:
        flags += ["--cp-comm-type", lay.cp_comm]
    if lay.cp_comm == "a2a+p2p":
        flags += ["--hierarchical-context-parallel-sizes", str(job.hier_a2a), str(lay.cp // job.hier_a2a)]
    if job.recompute:
        flags += ["--recompute-granularity", job.recompute]
    nodes = max(1, gpus // gpus_per_node)
    launch = f"torchrun --nnodes {nodes} --nproc-per-node {min(gpus, gpus_per_node)}"
    return f"{launch} pretrain.py {shlex.join(_user_flags(model_argv) + flags)}"


def _table(preds, top: int) -> str:
    head = f"{'tp':>3} {'cp':>3} {'dp':>4} {'pp':>3} {'v':>2} {'cp-comm':>10} {'recompute':>9} {'step s':>9} {'compute':>8} {'comm':>7} {'bubble':>7} {'tok/s/gpu':>10} {'TFLOP/s':>8} {'MFU':>6} {'mem GiB':>8}  {'w/g/opt/act/buf GiB':<24}"  # noqa: E501
    rows = [head]
    for p in preds[:top]:
        d, b = p.as_dict(), p.as_dict()["mem_breakdown_gib"]
        parts = "/".join(f"{b[k]:.1f}" for k in ("weights", "grads", "optimizer", "activations", "buffers"))
        rows.append(
            f"{d['tp']:>3} {d['cp']:>3} {d['dp']:>4} {d['pp']:>3} {d['vpp']:>2} "
            f"{d['cp_comm_type'] if d['cp'] > 1 else '-':>10} "
            f"{d['recompute'] or '-':>9} {d['step_time_s']:>9.3f} {d['compute_s']:>8.3f} {d['exposed_comm_s']:>7.3f} "
            f"{d['bubble_s']:>7.3f} {d['tokens_per_s_per_gpu']:>10.0f} {d['tflops_per_gpu']:>8.1f} "
            f"{100 * d['mfu']:>5.1f}% {d['mem_gib']:>8.1f}  {parts}" + ("" if p.fits else "  (does not fit)")
        )
    return "\n".join(rows)


def main(argv=None) -> int:
    argv = _split_preset(list(sys.argv[1:] if argv is None else argv))
    ns, rest = _planner_parser().parse_known_args(argv)
    if ns.calibrate:
        from .calibrate import calibrate

        calibrate(ns.calibrate)
        return 0
    try:
        cfg = C.parse(rest)
        hw = hardware.load(ns.hardware)
    except (C.ConfigError, ValueError) as exc:
        print(f"megalite-plan: error: {exc}", file=sys.stderr)
        return 2
    given = {k: v for k, v in vars(C.build_parser().parse_known_args(rest)[0]).items() if v is not None}
    fixed = {}
    for key, name in (("tensor_parallel_size", "tp"), ("context_parallel_size", "cp"), ("cp_comm_type", "cp_comm")):
        if key in given:
            fixed[name] = given[key]
    if "recompute_granularity" in given:
        fixed["recompute"] = given["recompute_granularity"]
    fixed["pp"] = ns.pipeline_parallel_size or 1
    if ns.num_layers_per_virtual_pipeline_stage:
        per_stage, per_virtual = cfg.model.num_layers // fixed["pp"], ns.num_layers_per_virtual_pipeline_stage
        if per_stage % per_virtual or cfg.model.num_layers % fixed["pp"]:
            print(
                f"megalite-plan: error: --num-layers {cfg.model.num_layers} / --pipeline-parallel-size {fixed['pp']} "
                f"is not a multiple of --num-layers-per-virtual-pipeline-stage {per_virtual}",
                file=sys.stderr,
            )
            return 2
        fixed["vpp"] = per_stage // per_virtual
    try:
        job = build_job(cfg, ns)
    except C.ConfigError as exc:
        print(f"megalite-plan: error: {exc}", file=sys.stderr)
        return 2
    preds = rank(job, hw, ns.gpus, ns.gpus_per_node, fixed)
    if ns.json:
        print(json.dumps([p.as_dict() for p in preds], indent=1))
        return 0
    if not preds:
        print("megalite-plan: no layout satisfies the divisibility rules; change --gpus or the fixed sizes")
        return 1
    print(f"{len(preds)} layouts of {ns.gpus} x {hw.name} ({ns.gpus_per_node} per node), fastest that fit first:")
    print(_table(preds, ns.top))
    best = preds[0]
    if not best.fits:
        print(f"\nnothing fits in {hw.memory_gib:g} GiB; the smallest needs {min(p.mem_gib for p in preds):.1f} GiB")
        return 1
    if best.layout.pp > 1:
        print("\nthe best layout uses pipeline parallelism, which megalite does not have (modelled only)")
    else:
        print("\n" + command(best, rest, ns.gpus, ns.gpus_per_node))
    assumed = [f for f in MODELLED if f not in pretrain_flags() and f in argv]
    if assumed:
        print(f"modelled, not yet flags of pretrain.py (left out of the command): {' '.join(assumed)}")
    return 0


def cli() -> None:
    sys.exit(main())
