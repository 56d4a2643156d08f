"""Configs and tensor names between transformers and megalite, in both directions.

Only exact equivalents: a setting that would change the numerics (sliding-window attention, a
RoPE variant megalite does not compute, partial rotary, a bias layout megalite has no flag for)
is refused with an error naming it, never approximated.

Layouts: Llama's separate q/k/v projections become megalite's one ``qkv`` whose rows are grouped
per query group ([q heads of group g, k_g, v_g] for each g; HF's query head h uses KV head
h // (heads / groups), the same grouping). GPT-NeoX's fused ``query_key_value`` is
[q_h, k_h, v_h] per head, which is megalite's layout without GQA, so it maps as is.
SwiGLU: megalite ``fc2(silu(gate(x)) * fc1(x))`` is Llama ``down(silu(gate(x)) * up(x))``.
"""

from __future__ import annotations

import torch

from ..config import ConfigError, ModelConfig

IMPORTABLE = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


class ConversionError(ConfigError):
    """Input a converter cannot translate exactly; the message names the file, tensor or option."""


def _rope_flags(hf: dict, where: str) -> dict:
    """--rotary-base and scaling flags from ``rope_parameters`` (transformers 5) or the older
    ``rope_theta`` + ``rope_scaling`` keys."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    kind = params.get("rope_type", params.get("type", "default"))
    flags = {"rotary-base": float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))}
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConversionError(f"{where}: partial_rotary_factor != 1 (partial RoPE) has no megalite equivalent")
    if kind == "llama3":
        flags.update(
            {
                "use-rope-scaling": True,
                "rope-scaling-factor": float(params["factor"]),
                "rope-scaling-low-freq-factor": float(params["low_freq_factor"]),
                "rope-scaling-high-freq-factor": float(params["high_freq_factor"]),
                "rope-scaling-original-max-position-embeddings": int(params["original_max_position_embeddings"]),
            }
        )
    elif kind == "linear":
        flags["rotary-seq-len-interpolation-factor"] = float(params["factor"])
    elif kind != "default":
        raise ConversionError(
            f"{where}: rope_type {kind!r} is not supported (megalite computes default, linear and llama3 RoPE)"
        )
    return flags


def _refuse_sliding_window(hf: dict, arch: str, where: str) -> None:
    sliding = hf.get("sliding_window") if arch != "Qwen2ForCausalLM" or hf.get("use_sliding_window") else None
    if "sliding_attention" in (hf.get("layer_types") or []):
        sliding = sliding or hf.get("sliding_window") or "set"
    if sliding:
        raise ConversionError(
            f"{where}: sliding-window attention (sliding_window {sliding}) is not supported: megalite attends to the "
            "whole causal context; only configs with sliding_window null (use_sliding_window false) import"
        )


def flags_from_hf(hf: dict, where: str) -> dict:
    """megalite model flags (``--config`` keys) for a transformers ``config.json`` dict."""
    arch = (hf.get("architectures") or [None])[0]
    if arch not in IMPORTABLE:
        raise ConversionError(
            f"{where}: architecture {arch!r} (model_type {hf.get('model_type')!r}) is not supported; "
            f"megalite-import-hf reads {', '.join(IMPORTABLE)}"
        )
    need = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"]
    missing = [k for k in need if k not in hf]
    if missing:
        raise ConversionError(f"{where}: missing {', '.join(missing)}")
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        raise ConversionError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (SwiGLU needs silu)")
    _refuse_sliding_window(hf, arch, where)
    heads = hf["num_attention_heads"]
    groups = hf.get("num_key_value_heads") or heads
    if arch == "Qwen2ForCausalLM":
        qkv_bias, bias = True, False
    else:
        attn_bias, mlp_bias = bool(hf.get("attention_bias")), bool(hf.get("mlp_bias"))
        if attn_bias != mlp_bias:
            raise ConversionError(
                f"{where}: attention_bias {attn_bias} with mlp_bias {mlp_bias} has no megalite equivalent "
                "(--add-bias-linear puts biases on all linear layers, --add-qkv-bias on QKV only)"
            )
        qkv_bias, bias = False, attn_bias
    return {
        "num-layers": hf["num_hidden_layers"],
        "hidden-size": hf["hidden_size"],
        "ffn-hidden-size": hf["intermediate_size"],
        "num-attention-heads": heads,
        "group-query-attention": groups != heads,
        "num-query-groups": groups if groups != heads else None,
        "kv-channels": hf.get("head_dim") or hf["hidden_size"] // heads,
        "max-position-embeddings": hf.get("max_position_embeddings"),
        "normalization": "RMSNorm",
        "norm-epsilon": hf.get("rms_norm_eps", 1e-6),
        "swiglu": True,
        "position-embedding-type": "rope",
        **_rope_flags(hf, where),
        "untie-embeddings-and-output-weights": not hf.get("tie_word_embeddings", False),
        "add-bias-linear": bias,
        "add-qkv-bias": qkv_bias,
        "vocab-size": hf["vocab_size"],
        "attention-dropout": float(hf.get("attention_dropout", 0.0)),
        "init-method-std": hf.get("initializer_range", 0.02),
    }


def _rope_parameters(m: ModelConfig) -> dict:
    params = {"rope_type": "default", "rope_theta": m.rotary_base}
    if m.use_rope_scaling:
        params.update(
            rope_type="llama3",
            factor=m.rope_scaling_factor,
            low_freq_factor=m.rope_scaling_low_freq_factor,
            high_freq_factor=m.rope_scaling_high_freq_factor,
            original_max_position_embeddings=m.rope_scaling_original_max_position_embeddings,
        )
    elif m.rotary_seq_len_interpolation_factor is not None:
        params.update(rope_type="linear", factor=m.rotary_seq_len_interpolation_factor)
    return params


def hf_config_for(m: ModelConfig, vocab: int) -> tuple[str, dict]:
    """(transformers architecture, config kwargs) computing exactly what megalite model ``m`` does."""

    def refuse(what: str):
        raise ConversionError(f"no transformers model computes exactly this megalite model: {what}")

    if m.position_embedding_type != "rope":
        refuse(f"--position-embedding-type {m.position_embedding_type} (export supports rope)")
    common = {
        "vocab_size": vocab,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "max_position_embeddings": m.max_position_embeddings or m.seq_length,
        "tie_word_embeddings": not m.untie_embeddings_and_output_weights,
        "attention_dropout": m.attention_dropout,
        "initializer_range": m.init_method_std,
    }
    if m.swiglu and m.normalization == "RMSNorm":
        llama = {
            **common,
            "num_key_value_heads": m.num_kv_heads,
            "head_dim": m.head_dim,
            "rms_norm_eps": m.norm_epsilon,
            "hidden_act": "silu",
            "rope_parameters": _rope_parameters(m),
        }
        if m.add_bias_linear:
            return "LlamaForCausalLM", {**llama, "attention_bias": True, "mlp_bias": True}
        if m.add_qkv_bias:
            return "Qwen2ForCausalLM", llama
        return "LlamaForCausalLM", llama
    if not m.swiglu and m.normalization == "LayerNorm":
        if not m.add_bias_linear:
            refuse("GPT-NeoX (LayerNorm + GELU) has biases on every linear layer; this model has --disable-bias-linear")
        if m.num_kv_heads != m.num_attention_heads:
            refuse("GPT-NeoX (LayerNorm + GELU) has no grouped-query attention; this model has --num-query-groups")
        if m.head_dim * m.num_attention_heads != m.hidden_size:
            refuse(f"GPT-NeoX needs head dim = hidden / heads; this model has --kv-channels {m.kv_channels}")
        return "GPTNeoXForCausalLM", {
            **common,
            "hidden_act": "gelu_pytorch_tanh",  # megalite's GELU is the tanh approximation
            "layer_norm_eps": m.norm_epsilon,
            "use_parallel_residual": False,
            "attention_bias": True,
            "rope_parameters": {**_rope_parameters(m), "partial_rotary_factor": 1.0},
        }
    refuse(f"--normalization {m.normalization} with {'SwiGLU' if m.swiglu else 'GELU'} MLP")


_LLAMA = {
    "input_norm.weight": "input_layernorm.weight",
    "pre_mlp_norm.weight": "post_attention_layernorm.weight",
    "attention.proj.weight": "self_attn.o_proj.weight",
    "attention.proj.bias": "self_attn.o_proj.bias",
    "mlp.gate.weight": "mlp.gate_proj.weight",
    "mlp.gate.bias": "mlp.gate_proj.bias",
    "mlp.fc1.weight": "mlp.up_proj.weight",
    "mlp.fc1.bias": "mlp.up_proj.bias",
    "mlp.fc2.weight": "mlp.down_proj.weight",
    "mlp.fc2.bias": "mlp.down_proj.bias",
}
_NEOX = {
    "input_norm.weight": "input_layernorm.weight",
    "input_norm.bias": "input_layernorm.bias",
    "pre_mlp_norm.weight": "post_attention_layernorm.weight",
    "pre_mlp_norm.bias": "post_attention_layernorm.bias",
    "attention.qkv.weight": "attention.query_key_value.weight",
    "attention.qkv.bias": "attention.query_key_value.bias",
    "attention.proj.weight": "attention.dense.weight",
    "attention.proj.bias": "attention.dense.bias",
    "mlp.fc1.weight": "mlp.dense_h_to_4h.weight",
    "mlp.fc1.bias": "mlp.dense_h_to_4h.bias",
    "mlp.fc2.weight": "mlp.dense_4h_to_h.weight",
    "mlp.fc2.bias": "mlp.dense_4h_to_h.bias",
}
_TOP = {
    "llama": {"embedding.word.weight": "model.embed_tokens.weight", "final_norm.weight": "model.norm.weight"},
    "neox": {
        "embedding.word.weight": "gpt_neox.embed_in.weight",
        "final_norm.weight": "gpt_neox.final_layer_norm.weight",
        "final_norm.bias": "gpt_neox.final_layer_norm.bias",
    },
}


def hf_names(name: str, family: str) -> tuple[str, ...]:
    """The transformers tensor(s) holding megalite parameter ``name`` (three for a Llama ``qkv``)."""
    if name == "output_layer.weight":
        return ("lm_head.weight",)
    if name in _TOP[family]:
        return (_TOP[family][name],)
    layer, _, rest = name.removeprefix("layers.").partition(".")
    if family == "llama":
        prefix = f"model.layers.{layer}."
        if rest.startswith("attention.qkv."):
            p = rest.rpartition(".")[2]
            return tuple(f"{prefix}self_attn.{x}_proj.{p}" for x in "qkv")
        return (prefix + _LLAMA[rest],)
    return (f"gpt_neox.layers.{layer}." + _NEOX[rest],)


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    """Llama q/k/v rows (weights or biases) -> megalite's per-group qkv rows."""
    g, d = m.num_kv_heads, m.head_dim
    per = m.num_attention_heads // g
    parts = [q.reshape(g, per * d, *q.shape[1:]), k.reshape(g, d, *k.shape[1:]), v.reshape(g, d, *v.shape[1:])]
    return torch.cat(parts, dim=1).reshape(-1, *q.shape[1:])


def split_qkv(qkv: torch.Tensor, m: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of fuse_qkv."""
    g, d = m.num_kv_heads, m.head_dim
    per = m.num_attention_heads // g
    q, k, v = qkv.reshape(g, (per + 2) * d, *qkv.shape[1:]).split([per * d, d, d], dim=1)
    return tuple(t.reshape(-1, *qkv.shape[1:]) for t in (q, k, v))
