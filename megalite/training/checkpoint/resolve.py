"""Finding the checkpoint ``--load`` resumes from: sizes and compatibility before any collective,
then the files' checksums, verified by all ranks together once the process group is up."""

from __future__ import annotations

import json
import os

import torch

from ...config import ConfigError
from ...model import GPT
from . import integrity
from .format import _ITER, _UNFINISHED, READABLE


def read_meta(ckpt_dir: str) -> dict:
    with open(os.path.join(ckpt_dir, "meta.json")) as fh:
        return json.load(fh)


def problem(ckpt_dir: str) -> str | None:
    """Why ``ckpt_dir`` is not a complete checkpoint, or None when it is."""
    try:
        meta = read_meta(ckpt_dir)
    except FileNotFoundError:
        return "no meta.json (save did not finish)"
    except (OSError, ValueError) as exc:
        return f"unreadable meta.json ({exc})"
    if meta.get("format") not in READABLE:
        return f"format {meta.get('format')} (this megalite reads formats {', '.join(map(str, READABLE))})"
    return next(filter(None, (integrity.file_problem(ckpt_dir, n, meta, checksum=False) for n in meta["files"])), None)


def list_checkpoints(save_dir: str) -> list[str]:
    """iter_* directory names, newest first."""
    names = [n for n in os.listdir(save_dir) if _ITER.match(n) and os.path.isdir(os.path.join(save_dir, n))]
    return sorted(names, key=lambda n: -int(_ITER.match(n).group(1)))


def read_latest(save_dir: str) -> str | None:
    try:
        with open(os.path.join(save_dir, "latest")) as fh:
            return fh.read().strip()
    except FileNotFoundError:
        return None


def resolve_load_dir(path: str, log=print, verify=None) -> str | None:
    """The checkpoint ``--load path`` resumes from, or None for a fresh start. A checkpoint is
    complete when its files have the sizes meta.json records and ``verify(ckpt_dir)`` (when
    given) finds no problem.

    - ``path`` missing: ConfigError (create the directory to start a run that later resumes).
    - ``path`` is a checkpoint (has meta.json): it, if complete.
    - otherwise the checkpoint ``latest`` names if complete, else the newest complete
      ``iter_*`` (a warning names each one skipped and why);
    - no ``iter_*`` and no ``latest`` (an empty dir, or only logs and unfinished saves):
      None, with a log line; leftovers of unfinished saves (``.tmp_iter_*``) get a warning;
    - ``iter_*`` or ``latest`` present but nothing complete: ConfigError listing each problem.
    """
    if not os.path.isdir(path):
        raise ConfigError(
            f"--load {path}: no such directory (to start a run that resumes from its own "
            f"checkpoints, create it first: mkdir -p {path})"
        )

    def check(ckpt):
        return problem(ckpt) or (verify(ckpt) if verify else None)

    if os.path.isfile(os.path.join(path, "meta.json")):
        why = check(path)
        if why:
            raise ConfigError(f"--load {path}: not a complete checkpoint: {why}")
        return path
    names, latest = list_checkpoints(path), read_latest(path)
    if latest is not None:
        if latest not in names:
            names.insert(0, latest)
        else:
            names.insert(0, names.pop(names.index(latest)))
    unfinished = sorted(n for n in os.listdir(path) if _UNFINISHED.match(n))
    if unfinished:
        log(
            f"megalite: warning: ignoring {', '.join(unfinished)} in {path}: saves that did not finish "
            "(the next save into this directory removes them)"
        )
    if not names:
        log(f"megalite: --load {path} holds no checkpoint yet; starting from iteration 0")
        return None
    skipped = []
    for name in names:
        ckpt = os.path.join(path, name)
        if not os.path.isdir(ckpt) and os.path.isdir(ckpt + ".old"):
            ckpt += ".old"  # set aside by a re-save of the same iteration that died before replacing it
        why = check(ckpt) if os.path.isdir(ckpt) else "missing"
        if why is None:
            if skipped:
                log(
                    f"megalite: warning: skipped incomplete or damaged checkpoints ({'; '.join(skipped)}); "
                    f"resuming from {name}"
                )
            return ckpt
        skipped.append(f"{name}: {why}" + (" ('latest' names it; missing or incomplete)" if name == latest else ""))
    raise ConfigError(
        f"--load {path}: no complete checkpoint ({'; '.join(skipped)}); remove the broken "
        "directories to start fresh, or point --load at a good checkpoint"
    )


def _few(items: list[str], sep: str = ", ") -> str:
    return sep.join(items[:3]) + (f" (+{len(items) - 3} more)" if len(items) > 3 else "")


def check_compatible(meta: dict, cfg, vocab_size: int, ckpt_dir: str) -> None:
    """Fail before any collective when the checkpoint's tensors do not fit this model: names the
    first mismatching tensors (compared as dense shapes with the real vocabulary rows)."""
    with torch.device("meta"):
        dense = GPT(cfg.model, vocab_size)
    want = {
        n: [vocab_size, *p.shape[1:]] if n in dense.VOCAB_PARAMETERS else list(p.shape)
        for n, p in dense.named_parameters()
    }
    have = {
        k.removeprefix("model/"): [e["real"], *e["shape"][1:]] if "real" in e else e["shape"]
        for k, e in meta["tensors"].items()
        if k.startswith("model/")
    }
    missing, extra = [n for n in want if n not in have], [n for n in have if n not in want]
    wrong = [
        f"{n} is {have[n]} in the checkpoint but {want[n]} in this model"
        for n in want
        if n in have and have[n] != want[n]
    ]
    issues = (
        ([f"tensors missing from the checkpoint: {_few(missing)}"] if missing else [])
        + ([f"tensors not in this model: {_few(extra)}"] if extra else [])
        + ([f"tensor {_few(wrong, '; ')}"] if wrong else [])
    )
    if issues:
        diff = {
            k: (v, getattr(cfg.model, k))
            for k, v in meta["model"].items()
            if hasattr(cfg.model, k) and getattr(cfg.model, k) != v
        }
        raise ConfigError(
            f"{ckpt_dir} holds a different model: {'; '.join(issues)}; "
            f"model flags differing (checkpoint, this run): {diff}"
        )


def verify_load_dir(path: str, ckpt_dir: str, cfg, vocab_size: int, log=print) -> str:
    """Collective over the world, after ``resolve_load_dir(path)`` chose ``ckpt_dir`` by sizes:
    checks its files' checksums (each rank reads a share). A corrupted checkpoint gives way to the
    newest older one that passes, with a warning naming the bad file; when ``--load`` named the
    checkpoint itself, or none passes, every rank raises the same ConfigError."""
    found = {}

    def verify(ckpt):
        if ckpt not in found:
            found[ckpt] = integrity.verify(ckpt, read_meta(ckpt))
        return found[ckpt]

    if verify(ckpt_dir) is None:
        return ckpt_dir
    chosen = resolve_load_dir(path, log, verify)
    check_compatible(read_meta(chosen), cfg, vocab_size, chosen)
    return chosen
