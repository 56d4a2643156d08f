"""``megalite-export-hf --load CKPT_DIR --out DIR [--dtype bf16|fp32]``: a megalite checkpoint of
any layout -> a transformers model directory (``config.json``, ``generation_config.json``,
safetensors, sharded with an index above ``--max-shard-size``, and the tokenizer).

Llama-style models (RMSNorm, SwiGLU) become LlamaForCausalLM (Qwen2ForCausalLM with
``--add-qkv-bias`` alone); megalite's GPT defaults (LayerNorm, GELU, biases) GPTNeoXForCausalLM
with sequential residuals. Anything else is refused naming the option. One process, no process
group; DIR appears only complete (written under a temporary name, then renamed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import torch

from ..config import ConfigError
from . import require, run_cli
from .ckpt_io import find_checkpoint, model_config, read_model
from .mapping import ConversionError, hf_config_for, hf_names, split_qkv

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SAMPLE = "def f(x):\n\treturn  x + 1  # naïve café 漢字\n\nclass A:  pass\n"


def hf_tensors(tensors: dict[str, torch.Tensor], m, family: str, dtype) -> dict[str, torch.Tensor]:
    out = {}
    for n, t in tensors.items():
        names = hf_names(n, family)
        parts = split_qkv(t, m) if len(names) == 3 else (t,)
        for x, part in zip(names, parts):
            out[x] = part.to(dtype).clone()  # own storage: safetensors refuses tensors sharing memory
    return out


def write_weights(out_dir: str, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> int:
    """safetensors files of at most ``max_shard_bytes`` each (a larger tensor gets its own);
    more than one comes with model.safetensors.index.json. Returns the number of files."""
    from safetensors.torch import save_file

    shards, size = [[]], 0
    for name, t in tensors.items():
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += t.nbytes
    if len(shards) == 1:
        save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        return 1
    weight_map = {}
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, os.path.join(out_dir, fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, fname))
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as fh:
        json.dump(index, fh, indent=1)
    return len(shards)


def write_tokenizer(out_dir: str, sp_model: str) -> dict:
    """tokenizer.model + config (and tokenizer.json) that AutoTokenizer loads to the same ids as
    megalite's sentencepiece tokenizer (checked on a sample); returns the special token ids."""
    from sentencepiece import SentencePieceProcessor
    from sentencepiece import sentencepiece_model_pb2 as pb
    from transformers import AutoTokenizer

    sp = SentencePieceProcessor(model_file=sp_model)
    proto = pb.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    shutil.copy(sp_model, os.path.join(out_dir, "tokenizer.model"))
    piece = {k: sp.id_to_piece(i) for k, i in [("bos", sp.bos_id()), ("eos", sp.eos_id()), ("unk", sp.unk_id())]}
    tok_cfg = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": False,  # megalite never adds one; documents end with eos
        "add_eos_token": False,
        "legacy": False,
        "add_prefix_space": proto.normalizer_spec.add_dummy_prefix,
        **{f"{k}_token": v for k, v in piece.items()},
        **({"pad_token": sp.id_to_piece(sp.pad_id())} if sp.pad_id() >= 0 else {}),
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as fh:
        json.dump(tok_cfg, fh, indent=1)
    hf = AutoTokenizer.from_pretrained(out_dir)
    if hf.encode(SAMPLE, add_special_tokens=False) != sp.encode(SAMPLE):
        raise ConversionError(f"{sp_model}: transformers' conversion of this tokenizer gives other ids; not exported")
    hf.save_pretrained(out_dir)  # adds tokenizer.json: loading it needs no sentencepiece
    return {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(), "pad_token_id": sp.pad_id()}


def find_tokenizer(load: str, ckpt: str, given: str | None) -> str | None:
    if given:
        if not os.path.isfile(given):
            raise ConfigError(f"--tokenizer-model {given}: no such file")
        return given
    for d in (load, os.path.dirname(ckpt.rstrip(os.sep))):
        if os.path.isfile(os.path.join(d, "tokenizer.model")):
            return os.path.join(d, "tokenizer.model")
    return None


def export_hf(load, out, dtype="fp32", tokenizer_model=None, max_shard_bytes=5 * 10**9, log=print) -> str:
    """Returns the transformers architecture written."""
    require("transformers", "safetensors")
    import transformers

    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ConfigError(f"--out {out} exists and is not empty; choose a new directory")
    ckpt = find_checkpoint(load)
    meta, tensors = read_model(ckpt)
    m, vocab = model_config(meta), meta["vocab_size"]
    arch, kwargs = hf_config_for(m, vocab)
    sp_model = find_tokenizer(load, ckpt, tokenizer_model)
    weights = hf_tensors(tensors, m, "neox" if arch == "GPTNeoXForCausalLM" else "llama", DTYPES[dtype])
    tmp = f"{out.rstrip(os.sep)}.tmp-export-{os.getpid()}"
    os.makedirs(tmp)
    try:
        special = write_tokenizer(tmp, sp_model) if sp_model else {}
        special = {k: v for k, v in special.items() if 0 <= v < vocab}
        cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
        cls(**kwargs, **special, architectures=[arch], dtype=str(DTYPES[dtype]).removeprefix("torch.")).save_pretrained(
            tmp
        )
        transformers.GenerationConfig(**special).save_pretrained(tmp)
        files = write_weights(tmp, weights, max_shard_bytes)
        if os.path.isdir(out):
            os.rmdir(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(
        f"megalite: exported {ckpt} (iteration {meta['iteration']}) as {arch}, {dtype}, {files} safetensors file(s)"
        + ("" if sp_model else "; no tokenizer (pass --tokenizer-model to include one)")
        + f" -> {out}"
    )
    return arch


def main(argv=None) -> int:
    p = argparse.ArgumentParser("megalite-export-hf", description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="checkpoint directory (or one iter_* in it)")
    p.add_argument("--out", required=True, help="new directory for the transformers model")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--tokenizer-model", help="sentencepiece .model (default: tokenizer.model in --load)")
    p.add_argument("--max-shard-size", type=float, default=5.0, help="GB per safetensors file (default 5)")
    a = p.parse_args(argv)
    return run_cli(
        "megalite-export-hf",
        lambda: export_hf(a.load, a.out, a.dtype, a.tokenizer_model, int(a.max_shard_size * 10**9)),
    )


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
