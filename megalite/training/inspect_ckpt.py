"""List what a checkpoint holds: `python -m megalite.training.inspect_ckpt DIR [--tensors]`.

DIR is a --save directory (every iter_* with its state, which one --load would resume from,
then that one in detail) or one iter_* directory. Reads meta.json and file sizes, and verifies
the checksums of the checkpoint it describes (reading its files), as a run's --load would.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys

import torch

from ..config import ConfigError, ModelConfig
from . import checkpoint
from .checkpoint import integrity


def _bytes(meta: dict, prefix: str) -> int:
    return sum(
        math.prod(e["shape"]) * getattr(torch, e["dtype"]).itemsize
        for k, e in meta["tensors"].items()
        if k.startswith(prefix)
    )


def describe(ckpt_dir: str, tensors: bool = False) -> list[str]:
    """Lines describing one complete checkpoint directory."""
    meta = checkpoint.read_meta(ckpt_dir)
    lay, m, t = meta["layout"], meta["model"], meta["tensors"]
    params = sum(
        math.prod(e["shape"][1:]) * e.get("real", e["shape"][0]) for k, e in t.items() if k.startswith("model/")
    )
    known = {f.name for f in dataclasses.fields(ModelConfig)}  # a checkpoint may predate or outlive a field
    groups = ModelConfig(**{k: v for k, v in m.items() if k in known}).num_kv_heads
    lines = [
        f"{ckpt_dir}:",
        f"  iteration {meta['iteration']}, consumed samples {meta['consumed_samples']}, "
        f"global batch {meta['global_batch_size']}, seed {meta['seed']}",
        f"  layout: TP={lay['tp']} CP={lay['cp']} DP={lay['dp']} (world {lay['world']})",
        f"  model: {m['num_layers']} layers, hidden {m['hidden_size']}, heads {m['num_attention_heads']} "
        f"({groups} query groups), {m['normalization']}, {'SwiGLU' if m['swiglu'] else 'GELU'}, "
        f"vocab {meta['vocab_size']}, {params / 1e6:.2f}M parameters",
        f"  tensors: {sum(k.startswith('model/') for k in t)} model ({_bytes(meta, 'model/'):,} bytes), "
        f"{sum(k.startswith('optim/') for k in t)} optimizer ({_bytes(meta, 'optim/'):,} bytes)",
        f"  files: {len(meta['files'])}, {sum(meta['files'].values()):,} bytes",
    ]
    for name, size in sorted(meta["files"].items()):
        if "crc32" not in meta:
            state = "no checksum (saved before megalite recorded them; size checked)"
        else:
            state = integrity.file_problem(ckpt_dir, name, meta, checksum=True) or "CRC-32 ok"
        lines.append(f"    {name}  {size:,} bytes  {state}")
    if tensors:
        for key, e in sorted(t.items()):
            rows = f" ({e['real']} real rows)" if "real" in e else ""
            split = (
                f"split on dim {e['dim']} over {', '.join(e['files'])}"
                if e["dim"] is not None
                else f"replicated, in {e['files'][0]}"
                if len(e["files"]) == 1
                else f"in {', '.join(e['files'])}"
            )
            if e.get("pieces", 1) > 1:
                split += f" (each TP shard in {e['pieces']} pieces along dim 0, FSDP2 over DP x CP)"
            lines.append(f"    {key}  {e['shape']}{rows} {e['dtype']} {split}")
    return lines


def report(path: str, tensors: bool = False) -> list[str]:
    if not os.path.isdir(path):
        raise ConfigError(f"{path}: no such directory")
    if os.path.isfile(os.path.join(path, "meta.json")):
        why = checkpoint.problem(path)
        return [f"{path}: incomplete: {why}"] if why else describe(path, tensors)
    latest = checkpoint.read_latest(path)
    lines = [f"{path}:"]
    for name in checkpoint.list_checkpoints(path):
        why = checkpoint.problem(os.path.join(path, name))
        lines.append(
            f"  {name}  {'complete' if why is None else 'INCOMPLETE: ' + why}"
            + ("  <- latest" if name == latest else "")
        )
    notes, checked = [], {}

    def verify(ckpt):  # what a run's collective check would find, read by this one process
        if ckpt not in checked:
            checked[ckpt] = "; ".join(integrity.bad_files(ckpt, checkpoint.read_meta(ckpt))) or None
        return checked[ckpt]

    try:
        chosen = checkpoint.resolve_load_dir(path, log=notes.append, verify=verify)
    except ConfigError as exc:
        return lines + [f"--load would fail: {exc}"]
    if chosen is None:
        return lines + notes
    return lines + notes + [f"--load resumes from {os.path.basename(chosen)}"] + describe(chosen, tensors)


def cli(argv=None) -> int:
    p = argparse.ArgumentParser("python -m megalite.training.inspect_ckpt", description=__doc__.split("\n")[0])
    p.add_argument("path", help="a --save directory or one iter_* checkpoint directory")
    p.add_argument("--tensors", action="store_true", help="also list every tensor (shape, dtype, split, files)")
    args = p.parse_args(argv)
    try:
        print("\n".join(report(args.path, args.tensors)))
    except ConfigError as exc:
        print(f"inspect_ckpt: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
