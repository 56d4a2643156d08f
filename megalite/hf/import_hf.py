"""``megalite-import-hf --hf-dir DIR --save CKPT_DIR``: a local transformers checkpoint
(``config.json`` + safetensors, nothing downloaded) -> a megalite checkpoint + ``model.json``.

Then ``pretrain.py --config CKPT_DIR/model.json --load CKPT_DIR --finetune ...`` trains it under
any layout. Everything is read and checked before anything is written, and CKPT_DIR appears
only complete (written under a temporary name, then renamed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import torch

from .. import config as C
from ..model import GPT
from . import require, run_cli
from .ckpt_io import write_model_checkpoint
from .mapping import ConversionError, flags_from_hf, fuse_qkv, hf_names

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some older checkpoints stored


class SafetensorsSource:
    """The tensors of a Hugging Face directory: ``model.safetensors`` or a sharded set with its index."""

    def __init__(self, hf_dir: str):
        from safetensors import safe_open

        index = os.path.join(hf_dir, "model.safetensors.index.json")
        single = os.path.join(hf_dir, "model.safetensors")
        if os.path.isfile(index):
            try:
                with open(index) as fh:
                    weight_map = json.load(fh)["weight_map"]
            except (ValueError, KeyError) as exc:
                raise ConversionError(f"{index}: not a safetensors index ({exc})") from None
        elif os.path.isfile(single):
            weight_map = None
        else:
            found = ", ".join(sorted(os.listdir(hf_dir))) or "nothing"
            raise ConversionError(
                f"{hf_dir}: no model.safetensors or model.safetensors.index.json (found {found}); "
                "save the model with save_pretrained(..., safe_serialization=True)"
            )
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        self.handles, self.where = {}, {}
        for f in files:
            path = os.path.join(hf_dir, f)
            if not os.path.isfile(path):
                held = sorted(k for k, v in weight_map.items() if v == f)
                raise ConversionError(f"{path} is missing (the index puts {len(held)} tensors there, e.g. {held[0]})")
            try:
                self.handles[f] = safe_open(path, framework="pt")
            except Exception as exc:  # safetensors raises its own error types for truncated or bad headers
                raise ConversionError(f"{path}: not a complete safetensors file ({exc})") from None
            for k in self.handles[f].keys():
                self.where[k] = f
        for k, f in (weight_map or {}).items():
            if self.where.get(k) != f:
                raise ConversionError(f"{os.path.join(hf_dir, f)} lacks tensor {k}, which {index} puts there")
        self.dir = hf_dir

    def shape(self, name: str) -> list[int]:
        return list(self.handles[self.where[name]].get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        try:
            return self.handles[self.where[name]].get_tensor(name)
        except Exception as exc:
            raise ConversionError(f"{self.path(name)}: cannot read tensor {name} ({exc})") from None

    def path(self, name: str) -> str:
        return os.path.join(self.dir, self.where[name])


def convert(src: SafetensorsSource, m: C.ModelConfig, vocab: int) -> dict[str, torch.Tensor]:
    """megalite parameter name -> fp32 tensor, every shape checked against the config."""
    with torch.device("meta"):
        ref = GPT(m, vocab)
    g, d = m.num_kv_heads, m.head_dim
    out, used = {}, set()
    for n, p in ref.named_parameters():
        want = [vocab, *p.shape[1:]] if n in GPT.VOCAB_PARAMETERS else list(p.shape)
        names = hf_names(n, "llama")
        shapes = [want] if len(names) == 1 else [[m.num_attention_heads * d, *want[1:]]] + [[g * d, *want[1:]]] * 2
        for x, shape in zip(names, shapes):
            if x not in src.where:
                raise ConversionError(f"{src.dir}: tensor {x} is missing (megalite's {n} needs it)")
            if src.shape(x) != shape:
                raise ConversionError(
                    f"{src.path(x)}: tensor {x} has shape {src.shape(x)} but config.json implies {shape}"
                )
        parts = [src.get(x).float() for x in names]
        out[n] = parts[0] if len(parts) == 1 else fuse_qkv(*parts, m)
        used.update(names)
    if not m.untie_embeddings_and_output_weights and "lm_head.weight" in src.where:
        if not torch.equal(src.get("lm_head.weight").float(), out["embedding.word.weight"]):
            raise ConversionError(
                f"{src.path('lm_head.weight')}: lm_head.weight differs from model.embed_tokens.weight "
                "but config.json sets tie_word_embeddings true"
            )
        used.add("lm_head.weight")
    extra = sorted(k for k in src.where if k not in used and not k.endswith(IGNORED_SUFFIXES))
    if extra:
        raise ConversionError(
            f"{src.dir}: tensors with no place in the model the config describes: {', '.join(extra[:5])}"
            + (f" (+{len(extra) - 5} more)" if len(extra) > 5 else "")
        )
    return out


def model_flags(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{hf_dir}: no config.json (is this a Hugging Face model directory?)")
    try:
        with open(path) as fh:
            hf = json.load(fh)
    except ValueError as exc:
        raise ConversionError(f"{path}: not valid JSON ({exc})") from None
    flags = {k: v for k, v in flags_from_hf(hf, path).items() if v is not None}
    if flags.get("max-position-embeddings"):  # a default a run can raise with --seq-length
        flags["seq-length"] = min(flags["max-position-embeddings"], 4096)
    return flags


def import_hf(hf_dir: str, save: str, seed: int = 1234, log=print) -> None:
    if not os.path.isdir(hf_dir):
        raise ConversionError(f"--hf-dir {hf_dir}: no such directory")
    if os.path.exists(save) and (not os.path.isdir(save) or os.listdir(save)):
        raise ConversionError(f"--save {save} exists and is not empty; choose a new directory")
    require("safetensors")
    flags = model_flags(hf_dir)
    src = SafetensorsSource(hf_dir)
    tmp = f"{save.rstrip(os.sep)}.tmp-import-{os.getpid()}"
    os.makedirs(tmp)
    try:
        model_json = os.path.join(tmp, "model.json")
        with open(model_json, "w") as fh:
            json.dump(flags, fh, indent=1)
        m = C.parse(["--config", model_json]).model  # the checks pretrain.py will make
        tensors = convert(src, m, flags["vocab-size"])
        write_model_checkpoint(tmp, m, flags["vocab-size"], tensors, seed)
        tokenizer = os.path.join(hf_dir, "tokenizer.model")
        if os.path.isfile(tokenizer):
            shutil.copy(tokenizer, os.path.join(tmp, "tokenizer.model"))
        if os.path.isdir(save):
            os.rmdir(save)
        os.replace(tmp, save)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n = sum(t.numel() for t in tensors.values())
    log(
        f"megalite: imported {hf_dir} ({n / 1e6:.1f}M parameters) into {save}; continue training with\n"
        f"  pretrain.py --config {save}/model.json --load {save} --finetune --data-path ... --tokenizer-model ..."
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser("megalite-import-hf", description=__doc__.split("\n\n")[0])
    p.add_argument("--hf-dir", required=True, help="local directory with config.json and safetensors")
    p.add_argument("--save", required=True, help="new megalite checkpoint directory")
    a = p.parse_args(argv)
    return run_cli("megalite-import-hf", lambda: import_hf(a.hf_dir, a.save))


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
