"""megalite checkpoints read and written in one process, without a process group.

``write_model_checkpoint`` writes the format pretrain.py saves (see
megalite.training.checkpoint), as if saved by one rank at iteration 0, with the model tensors
only (no optimizer state, no RNG streams): it loads under any layout, and with ``--finetune``
training starts from it. ``read_model`` reads the dense model of a checkpoint of any layout.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch

from ..config import ConfigError, ModelConfig, padded_vocab_size
from ..model import GPT
from ..training.checkpoint import problem, resolve_load_dir
from ..training.checkpoint.format import FORMAT, _iter_name, _rank_file, _write_atomic
from ..training.checkpoint.integrity import ChecksumWriter, bad_files
from ..training.checkpoint.reshard_load import _Reader


def model_config(meta: dict) -> ModelConfig:
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in meta["model"].items() if k in names})


def write_model_checkpoint(save_dir: str, m: ModelConfig, vocab: int, tensors: dict[str, torch.Tensor], seed: int):
    """``tensors``: megalite parameter name -> dense tensor (vocabulary tensors with ``vocab`` rows)."""
    padded = padded_vocab_size(vocab, m.make_vocab_size_divisible_by, 1)
    name, index, stored = _iter_name(0), {}, {}
    for n, t in tensors.items():
        real = None
        if n in GPT.VOCAB_PARAMETERS:
            real, t = vocab, torch.cat([t, t.new_zeros(padded - vocab, *t.shape[1:])])
        stored[f"model/{n}"] = t.contiguous()
        index[f"model/{n}"] = {
            "shape": list(t.shape),
            "dtype": str(t.dtype).removeprefix("torch."),
            "dim": None,
            "files": [_rank_file(0)],
            **({"real": real} if real else {}),
        }
    ckpt = os.path.join(save_dir, name)
    os.makedirs(ckpt)
    with open(os.path.join(ckpt, _rank_file(0)), "wb") as fh:
        out = ChecksumWriter(fh)
        torch.save({"tensors": stored}, out)
        fh.flush()
        os.fsync(fh.fileno())
    meta = {
        "format": FORMAT,
        "iteration": 0,
        "consumed_samples": 0,
        "global_batch_size": None,
        "seed": seed,
        "layout": {"tp": 1, "cp": 1, "dp": 1, "world": 1},
        "model": dataclasses.asdict(m),
        "vocab_size": vocab,
        "files": {_rank_file(0): out.size},
        "crc32": {_rank_file(0): out.crc32},
        "tensors": index,
    }
    _write_atomic(os.path.join(ckpt, "meta.json"), json.dumps(meta, indent=1))
    _write_atomic(os.path.join(save_dir, "latest"), name + "\n")


def find_checkpoint(path: str) -> str:
    """The checkpoint ``--load path`` would use, checked (sizes and checksums) in this process."""
    ckpt = resolve_load_dir(path, log=lambda *a: None)
    if ckpt is None:
        raise ConfigError(f"--load {path}: no checkpoint in it")
    with open(os.path.join(ckpt, "meta.json")) as fh:
        meta = json.load(fh)
    bad = problem(ckpt) or "; ".join(bad_files(ckpt, meta))
    if bad:
        raise ConfigError(f"--load {path}: {ckpt} is damaged: {bad}")
    return ckpt


def read_model(ckpt: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, parameter name -> dense tensor) of checkpoint ``ckpt``, saved under any layout;
    vocabulary tensors keep their real rows only."""
    with open(os.path.join(ckpt, "meta.json")) as fh:
        meta = json.load(fh)
    reader, out = _Reader(ckpt, meta), {}
    for key, e in meta["tensors"].items():
        if key.startswith("model/"):
            dense = reader.region(key, [0] * len(e["shape"]), e["shape"], getattr(torch, e["dtype"]))
            out[key.removeprefix("model/")] = dense[: e["real"]] if "real" in e else dense
    return meta, out


def load_gpt(ckpt: str, device="cpu") -> tuple[GPT, dict]:
    """A single-device GPT holding the weights of checkpoint ``ckpt``, and its meta."""
    meta, tensors = read_model(ckpt)
    model = GPT(model_config(meta), meta["vocab_size"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.zero_()
            p[: tensors[n].shape[0]] = tensors[n]  # vocabulary padding rows stay zero
    return model.to(device), meta
