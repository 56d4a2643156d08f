"""Hugging Face interop: import -> same logits as transformers, export -> same tensors, RoPE
variants beyond the original context, KV-cache generation, and bad input refused."""

import json
import os
import re

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import transformers  # noqa: E402
from hf_utils import LINEAR, LLAMA3, make_hf, safetensors_dir  # noqa: E402

from megalite.config import ConfigError  # noqa: E402
from megalite.generate import generate  # noqa: E402
from megalite.hf.ckpt_io import find_checkpoint, load_gpt  # noqa: E402
from megalite.hf.export_hf import export_hf  # noqa: E402
from megalite.hf.import_hf import import_hf  # noqa: E402

CASES = {
    # GQA, untied, Llama 3.1 scaling (original context 16, tested at 64)
    "llama-llama3": ("llama", dict(num_key_value_heads=2, rope_parameters=LLAMA3)),
    "llama-linear-tied-bias": (
        "llama",
        dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True, rope_parameters=LINEAR),
    ),
    "mistral-theta": ("mistral", dict(num_key_value_heads=1, head_dim=32, rope_parameters={"rope_theta": 1e6})),
    "qwen2-tied": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True)),
}


def logits_of(model, ids):
    with torch.no_grad():
        return model(ids, torch.arange(ids.shape[1]).expand_as(ids))[..., : model.vocab_size]


@pytest.mark.parametrize("case", CASES)
def test_import_matches_transformers_and_export_round_trips(tmp_path, case):
    arch, kw = CASES[case]
    hf = make_hf(tmp_path / "hf", arch, **kw)
    import_hf(str(tmp_path / "hf"), str(tmp_path / "ck"), log=lambda *a: None)
    model, _ = load_gpt(find_checkpoint(str(tmp_path / "ck")))
    ids = torch.randint(0, 203, (2, 64), generator=torch.Generator().manual_seed(1))  # 4x the llama3 original
    ref = hf(ids).logits.detach()
    torch.testing.assert_close(logits_of(model, ids), ref, rtol=0, atol=1e-4)
    assert export_hf(str(tmp_path / "ck"), str(tmp_path / "out"), log=lambda *a: None) == (
        "Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"  # a Mistral without sliding window is a Llama
    )
    before, after = safetensors_dir(tmp_path / "hf"), safetensors_dir(tmp_path / "out")
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert back.config.rope_parameters == hf.config.rope_parameters
    torch.testing.assert_close(back(ids).logits.detach(), ref, rtol=0, atol=1e-4)


def test_bf16_checkpoint_round_trips_exactly(tmp_path):
    """Released checkpoints are mostly bf16: import widens them to fp32 (exactly), export --dtype bf16
    gives back the same bits."""
    make_hf(tmp_path / "fp32", "qwen2", num_key_value_heads=2).to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    import_hf(str(tmp_path / "hf"), str(tmp_path / "ck"), log=lambda *a: None)
    export_hf(str(tmp_path / "ck"), str(tmp_path / "out"), dtype="bf16", log=lambda *a: None)
    before, after = safetensors_dir(tmp_path / "hf"), safetensors_dir(tmp_path / "out")
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].dtype == torch.bfloat16 and torch.equal(before[k], after[k]), k


def test_sharded_export_and_import(tmp_path):
    make_hf(tmp_path / "hf", "llama")
    import_hf(str(tmp_path / "hf"), str(tmp_path / "ck"), log=lambda *a: None)
    export_hf(str(tmp_path / "ck"), str(tmp_path / "out"), max_shard_bytes=60_000, log=lambda *a: None)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert safetensors_dir(tmp_path / "out").keys() == index["weight_map"].keys()
    import_hf(str(tmp_path / "out"), str(tmp_path / "ck2"), log=lambda *a: None)  # reads the index
    a, b = (load_gpt(find_checkpoint(str(tmp_path / d)))[0] for d in ("ck", "ck2"))
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


def test_bf16_export_and_gpt_neox(tmp_path):
    """megalite's GPT defaults (LayerNorm, tanh GELU, biases, RoPE) export as GPT-NeoX with
    sequential residuals; bf16 export casts every tensor, nothing else."""
    from megalite.config import ModelConfig
    from megalite.hf.ckpt_io import write_model_checkpoint

    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32, rotary_base=5e4)
    from megalite.model import GPT

    ref = GPT(cfg, 203, seed=3)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
    tensors = {n: p.detach()[:203] if n in GPT.VOCAB_PARAMETERS else p.detach() for n, p in ref.named_parameters()}
    write_model_checkpoint(str(tmp_path / "ck"), cfg, 203, tensors, seed=3)
    assert export_hf(str(tmp_path / "ck"), str(tmp_path / "out"), log=lambda *a: None) == "GPTNeoXForCausalLM"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 203, (2, 32), generator=torch.Generator().manual_seed(2))
    ref._mask_padding = lambda x: x  # compare the real columns only
    torch.testing.assert_close(hf(ids).logits.detach(), logits_of(ref.eval(), ids), rtol=0, atol=1e-4)
    export_hf(str(tmp_path / "ck"), str(tmp_path / "bf16"), dtype="bf16", log=lambda *a: None)
    fp32, bf16 = safetensors_dir(tmp_path / "out"), safetensors_dir(tmp_path / "bf16")
    for k in fp32:
        assert bf16[k].dtype == torch.bfloat16 and torch.equal(bf16[k], fp32[k].bfloat16()), k


def test_generate_with_kv_cache_equals_transformers_greedy(tmp_path):
    hf = make_hf(tmp_path / "hf", "llama", num_key_value_heads=2, rope_parameters=LLAMA3)
    import_hf(str(tmp_path / "hf"), str(tmp_path / "ck"), log=lambda *a: None)
    model, _ = load_gpt(find_checkpoint(str(tmp_path / "ck")))
    prompt = [5, 17, 99, 3, 42, 7]
    ours = generate(model, prompt, 40)
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, eos_token_id=None)
    assert ours == theirs[0, len(prompt) :].tolist()
    # the cache is an optimisation: no-cache greedy decoding gives the same tokens
    seq = list(prompt)
    for _ in range(10):
        seq.append(int(logits_of(model.eval(), torch.tensor([seq]))[0, -1].argmax()))
    assert seq[len(prompt) :] == ours[:10]
    sampled = generate(model, prompt, 20, temperature=0.8, top_k=20, top_p=0.9, seed=5)
    assert sampled == generate(model, prompt, 20, temperature=0.8, top_k=20, top_p=0.9, seed=5)
    assert all(0 <= t < 203 for t in sampled) and sampled != ours[:20]


def _break(hf_dir, how):
    cfg_path = hf_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if how == "no config":
        cfg_path.unlink()
        return "no config.json"
    if how == "no weights":
        (hf_dir / "model.safetensors").unlink()
        return "no model.safetensors"
    if how == "truncated":
        data = (hf_dir / "model.safetensors").read_bytes()
        (hf_dir / "model.safetensors").write_bytes(data[: len(data) // 2])
        return "model.safetensors: not a complete safetensors file"
    if how == "shape":
        cfg["intermediate_size"] = 128
        cfg_path.write_text(json.dumps(cfg))
        return "model.safetensors: tensor model.layers.0.mlp.up_proj.weight has shape [96, 64] but config.json implies"
    if how == "architecture":
        cfg["architectures"] = ["GPT2LMHeadModel"]
        cfg_path.write_text(json.dumps(cfg))
        return "architecture 'GPT2LMHeadModel'"
    if how == "sliding window":
        cfg.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=32)
        cfg_path.write_text(json.dumps(cfg))
        return "sliding-window attention (sliding_window 32)"
    if how == "rope type":
        cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}
        cfg_path.write_text(json.dumps(cfg))
        return "rope_type 'yarn'"
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how", ["no config", "no weights", "truncated", "shape", "architecture", "sliding window", "rope type"]
)
def test_bad_input_is_refused_and_nothing_written(tmp_path, how):
    make_hf(tmp_path / "hf", "llama")
    expected = _break(tmp_path / "hf", how)
    with pytest.raises(ConfigError, match=re.escape(expected)):
        import_hf(str(tmp_path / "hf"), str(tmp_path / "ck"), log=lambda *a: None)
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_sharded_index_problems_name_the_file_and_tensor(tmp_path):
    make_hf(tmp_path / "hf", "llama")
    import_hf(str(tmp_path / "hf"), str(tmp_path / "ck"), log=lambda *a: None)
    export_hf(str(tmp_path / "ck"), str(tmp_path / "out"), max_shard_bytes=60_000, log=lambda *a: None)
    index_path = tmp_path / "out" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00099.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(ConfigError, match=r"model-00001-of-00099.safetensors is missing .*model.norm.weight"):
        import_hf(str(tmp_path / "out"), str(tmp_path / "ck2"), log=lambda *a: None)
    first = sorted(set(index["weight_map"].values()) - {"model-00001-of-00099.safetensors"})[0]
    index["weight_map"]["model.norm.weight"] = first
    index_path.write_text(json.dumps(index))
    with pytest.raises(ConfigError, match=f"{first} lacks tensor model.norm.weight"):
        import_hf(str(tmp_path / "out"), str(tmp_path / "ck2"), log=lambda *a: None)
    assert not (tmp_path / "ck2").exists()


def test_export_refuses_models_without_an_exact_equivalent(tmp_path):
    from megalite.config import ModelConfig
    from megalite.hf.ckpt_io import write_model_checkpoint
    from megalite.model import GPT

    cfg = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=2, normalization="RMSNorm")
    tensors = {n: p.detach()[:50] for n, p in GPT(cfg, 50).named_parameters()}
    write_model_checkpoint(str(tmp_path / "ck"), cfg, 50, tensors, seed=0)
    with pytest.raises(ConfigError, match="--normalization RMSNorm with GELU MLP"):
        export_hf(str(tmp_path / "ck"), str(tmp_path / "out"), log=lambda *a: None)
    assert sorted(os.listdir(tmp_path)) == ["ck"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--finetune"], "--finetune given without --load DIR"),
        (["--no-load-optim", "--no-load-rng"], "--no-load-optim, --no-load-rng given without --load DIR"),
        (["--use-rope-scaling", "--rotary-seq-len-interpolation-factor", "2"], "choose one"),
        (["--use-rope-scaling", "--rope-scaling-low-freq-factor", "4"], "below --rope-scaling-high-freq-factor"),
        (["--rotary-seq-len-interpolation-factor", "2", "--position-embedding-type", "learned_absolute"], "rescale"),
        (["--eval-sample-prompt", "x", "--tensor-parallel-size", "2", "--sequence-parallel"], "--sequence-parallel"),
    ],
)
def test_flag_checks(argv, message):
    from megalite import config as C

    with pytest.raises(ConfigError, match=message):
        C.parse(argv)


def test_commands_exit_2_with_the_message(tmp_path, capsys):
    from megalite.hf import export_hf as export_cmd
    from megalite.hf import import_hf as import_cmd

    assert import_cmd.main(["--hf-dir", str(tmp_path / "none"), "--save", str(tmp_path / "ck")]) == 2
    assert f"megalite-import-hf: error: --hf-dir {tmp_path / 'none'}: no such directory" in capsys.readouterr().err
    assert export_cmd.main(["--load", str(tmp_path / "none"), "--out", str(tmp_path / "out")]) == 2
    assert "megalite-export-hf: error: --load" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == []
