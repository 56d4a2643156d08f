"""Bytes per rank: weights, gradients, optimizer state, activations and transient buffers.

Activations follow what megalite's model really saves (measured with saved-tensor hooks; the
tests check it), per layer and token, with a = compute bytes (2 bf16, 4 fp32), r = residual
bytes (parameter dtype), h hidden, n heads, g KV heads, d head dim, f MLP width, t = TP:
  norm inputs              2 r h      (/t under SP: the residual stream is sequence-sharded)
  norm statistics          16 bytes   (mean and rstd of two norms, fp32)
  qkv and fc1 inputs       2 a h      (never /t: under SP the all-gathered input is what is saved)
  q, k, v, out, proj input a (3 n + 2 g) d / t; the proj input is a view of out when the
                           micro batch is 1: a (2 n + 2 g) d / t (Ulysses: one copy more)
  log-sum-exp              4 n / t
  MLP                      2 a f / t (GELU: fc1 and GELU outputs), 4 a f / t (SwiGLU); 0 when
                           sequence-tiled (--mlp-tile-size: each tile is recomputed in backward)
Selective recompute drops out and lse; full recompute keeps r h per layer (the layer input;
in host memory for offloaded layers) and rebuilds one layer at a time in backward.
Korthikanti et al. (2022) count 34 s b h + 5 a s^2 b for Megatron with dropout masks and a
materialised score matrix; megalite has neither (fused attention, no dropout masks at p = 0),
but saves linear inputs at full length under SP, so its own formula is used; ``Job.megatron``
switches to theirs for published runs.
"""

from __future__ import annotations

import dataclasses
import math

from ..config import padded_vocab_size
from .flops import layer_weights, output_weights
from .spec import Job, Layout

GIB = 2**30


def layer_params(job: Job, t: int) -> float:
    """Parameters of one layer on one TP rank (weights, biases, norm gains)."""
    m = job.model
    h, f = m.hidden_size, m.ffn_size
    norms = 2 * h * (2 if m.normalization == "LayerNorm" else 1)
    bias = 0
    if m.add_bias_linear:
        bias = ((m.num_attention_heads + 2 * m.num_kv_heads) * m.head_dim + (2 if m.swiglu else 1) * f) / t + 2 * h
    return layer_weights(m) / t + bias + norms


def stage_params(job: Job, lay: Layout) -> float:
    """Parameters held by the busiest pipeline stage of one TP rank: its layers plus the
    vocabulary tables (the first stage's embedding and the last stage's output layer)."""
    m = job.model
    vocab = padded_vocab_size(job.vocab_size, m.make_vocab_size_divisible_by, lay.tp) * m.hidden_size / lay.tp
    tables = vocab * (2 if m.untie_embeddings_and_output_weights else 1)
    if lay.pp > 1:  # embedding and output layer sit on different stages
        tables = vocab
    if m.position_embedding_type == "learned_absolute" and lay.pp == 1:
        tables += (m.max_position_embeddings or job.seq_length) * m.hidden_size
    final_norm = m.hidden_size * (2 if m.normalization == "LayerNorm" else 1)
    return math.ceil(m.num_layers / lay.pp) * layer_params(job, lay.tp) + tables + final_norm


def state_bytes_per_param(job: Job, shard: int) -> dict:
    """Bytes per parameter of weights, grads and optimizer state at rest, and of the working set
    (``gathered``: compute weights held between forward and backward), over ``shard`` = DP x CP.

    DDP / Megatron: fp32 and bf16-autocast keep fp32 weights (the masters), fp32 grads, Adam m, v;
    bf16 adds bf16 weights to an fp32 master (Megatron's 18, or 6 + 12/d with ``optim``).
    FSDP2 (``job.fsdp``, megalite's sharded path): fp32 masters, fp32 grads and Adam (16 bytes) at
    rest, divided by d unless ``no_shard`` (``optim`` runs as ``optim_grads``: FSDP2 cannot shard
    only the optimizer); the compute copy (4 or 2 bytes) is gathered for the whole model between
    forward and backward, or one layer at a time with ``optim_grads_params`` and per-layer units
    (--overlap-grad-reduce). FSDP2 wraps only when DP x CP > 1 or under bf16."""
    s = job.sharding
    if job.fsdp and (shard > 1 or job.precision == "bf16"):  # else megalite runs the plain model
        d = 1 if s == "no_shard" else shard
        compute = 2 if job.precision == "bf16" else 4
        return {
            "weights": 4 / d,
            "grads": 4 / d,
            "optimizer": 8 / d,
            "gathered": compute,
            "per_layer": s == "optim_grads_params" and job.overlap_grad_reduce,  # else one unit: all of it
        }
    if job.fsdp:
        return {"weights": 4, "grads": 4, "optimizer": 8, "gathered": 0, "per_layer": False}
    w = job.param_bytes
    opt = 8 + (4 if job.precision == "bf16" else 0)
    return {
        "weights": w / shard if s == "optim_grads_params" else w,
        "grads": 4 / shard if s in ("optim_grads", "optim_grads_params") else 4,
        "optimizer": opt / shard if s != "no_shard" else opt,
        "gathered": w if s == "optim_grads_params" else 0,
        "per_layer": True,
    }


def layer_activation_bytes(job: Job, lay: Layout, tokens: float) -> float:
    """Bytes one layer saves for backward for ``tokens`` tokens of this CP rank (before SP)."""
    m = job.model
    h, d, t = m.hidden_size, m.head_dim, lay.tp
    n, g, f = m.num_attention_heads / t, m.num_kv_heads / t, m.ffn_size / t
    a, r = job.act_bytes, job.param_bytes
    if job.megatron:
        return _korthikanti(job, lay, tokens)
    residual = 2 * r * h / (t if lay.sp else 1)
    if job.recompute == "full":
        return tokens * residual / 2
    mlp = 0 if job.mlp_tile else (4 if m.swiglu else 2) * a * f  # tiled: only the input, already counted
    per_token = residual + 16 + 2 * a * h + a * (n + 2 * g) * d + mlp
    if job.recompute == "selective":
        return tokens * (per_token + a * n * d)  # the proj input; attention's own saves are recomputed
    # Copies of the attention output [b, s, n d] the layer keeps: the output, and the proj input
    # made from it, a view when the micro batch is 1; Ulysses' all-to-all back adds one (measured:
    # its output, and at micro batch 1 a reshaped copy as well).
    ulysses = lay.cp > 1 and lay.cp_comm.startswith("a2a")
    copies = (1 if job.micro_batch_size == 1 else 2) + (ulysses and job.micro_batch_size == 1)
    return tokens * (per_token + a * n * d * copies + 4 * n)


def _korthikanti(job: Job, lay: Layout, tokens: float) -> float:
    """Korthikanti et al. eq. (activations per layer, 16-bit, with SP when ``lay.sp``)."""
    h, t = job.model.hidden_size, lay.tp
    if job.recompute == "full":
        return tokens * 2 * h / (t if lay.sp else 1)
    per_token = 34 * h / t if lay.sp else (10 + 24 / t) * h
    if job.recompute != "selective":
        per_token += 5 * job.model.num_attention_heads * job.seq_length / lay.cp / t
    return tokens * per_token


def head_bytes(job: Job, lay: Layout, tokens: float) -> tuple[float, float]:
    """(saved, transient) bytes of the final norm, output layer and loss for ``tokens`` tokens.
    Saved: the final norm's input, output and statistics, the token ids and labels, and the
    loss's fp32 softmax over this rank's vocabulary; transient in backward: the fp32 gradient of
    the softmax input and the logits' gradient in the compute dtype (under bf16 twice: cast back
    from the fp32 loss, then through the padding mask). With the fused, token-tiled loss only one
    chunk of the vocabulary-wide tensors exists at a time, and its gradient is taken in forward."""
    m = job.model
    v = padded_vocab_size(job.vocab_size, m.make_vocab_size_divisible_by, lay.tp) / lay.tp
    chunk = min(tokens, job.loss_chunk or tokens)
    norm_in = tokens * (job.param_bytes * m.hidden_size / (lay.tp if lay.sp else 1) + 8)  # input, statistics
    if job.loss_chunk:  # the gradient is taken chunk by chunk in forward: kept are the gradient of the
        # final norm's output (compute dtype; the output itself is not kept) and the output weight's (fp32)
        saved = norm_in + 16 * tokens + job.act_bytes * tokens * m.hidden_size + 4 * v * m.hidden_size
        return saved, chunk * v * (8 + job.act_bytes)
    norm = norm_in + tokens * job.act_bytes * m.hidden_size
    cast = job.act_bytes if job.act_bytes < 4 else 0
    return norm + 16 * tokens + 4 * tokens * v, tokens * v * (4 + job.act_bytes + cast)


def cp_buffer_bytes(job: Job, lay: Layout, tokens: float) -> float:
    """K/V blocks in flight in ring attention's backward: the held and the incoming K/V, two
    fp32 partial dK/dV (held and arriving) and the fp32 dq."""
    if lay.cp == 1:
        return 0.0
    m = job.model
    kv = 2 * tokens * m.num_kv_heads / lay.tp * m.head_dim
    return kv * (2 * job.act_bytes + 2 * 4) + 4 * tokens * m.num_attention_heads / lay.tp * m.head_dim


def in_flight_micro_batches(lay: Layout, micro_batches: int) -> float:
    """Micro-batches whose activations the first pipeline stage holds at once under 1F1B
    (interleaved: Megatron's p (1 + (p - 1) / (p v)))."""
    if lay.pp == 1:
        return 1
    held = lay.pp * (1 + (lay.pp - 1) / (lay.pp * lay.vpp)) if lay.vpp > 1 else lay.pp
    return min(held, micro_batches)


def breakdown(job: Job, lay: Layout, baseline_gib: float = 0.0) -> dict:
    """Bytes per rank live at the predicted peak, by kind, their sum ``total`` and the
    ``moment`` of the peak. Candidates: the start of backward (every saved activation and the
    loss gradients), the last layer's ring attention backward under CP, the recompute of the
    last layer under full recompute, and the end of backward (every gradient, activations
    freed); weights, optimizer state and persistent buffers are live throughout (gradients are
    freed at each step)."""
    m = job.model
    params = stage_params(job, lay)
    per = state_bytes_per_param(job, lay.dp * lay.cp)
    tokens = job.micro_batch_size * job.seq_length / lay.cp
    layers = math.ceil(m.num_layers / lay.pp)
    held = in_flight_micro_batches(lay, lay.micro_batches(job))
    on_device = layers - (min(job.offload_layers, layers) if job.recompute == "full" else 0)
    acts = on_device * held * layer_activation_bytes(job, lay, tokens)
    rope = 2 * 4 * tokens * m.head_dim if m.position_embedding_type == "rope" else 0
    head_saved, head_transient = head_bytes(job, lay, tokens)
    acts += rope + head_saved
    persistent = 0.0
    if not (job.fsdp or job.megatron) and job.sharding == "no_shard" and lay.dp * lay.cp > 1:
        persistent += 4 * params  # DDP's flat gradient buckets
    gathered = per["gathered"] * (2 * layer_params(job, lay.tp) if per["per_layer"] else params)
    mlp_tile = 0.0
    if job.mlp_tile and job.recompute != "full":  # one tile's intermediates, rebuilt in backward
        mlp_tile = min(job.mlp_tile, tokens) * (4 if m.swiglu else 2) * job.act_bytes * m.ffn_size / lay.tp
    if job.precision == "bf16-autocast":  # autocast's bf16 weight copies, saved for backward
        saved_layers = 0 if job.recompute == "full" else layers
        acts += 2 * (saved_layers * layer_weights(m) + output_weights(m, job.vocab_size, lay.tp)) / lay.tp
    out_grad = per["grads"] * output_weights(m, job.vocab_size, lay.tp) / lay.tp
    moments = {
        "start of backward": (acts, 0.0, gathered + head_transient + mlp_tile),
        "end of backward": (0.0, per["grads"] * params, 0.0),
    }
    incoming = 4 * tokens * m.hidden_size  # the gradient arriving at the last layer
    if lay.cp > 1:  # the loss is done; the last layer's ring runs with its K/V blocks in flight
        moments["last layer's attention backward"] = (
            acts - head_saved,
            out_grad,
            gathered + incoming + cp_buffer_bytes(job, lay, tokens),
        )
    if job.recompute == "full":  # the loss is done; the last layer is rebuilt (with its weight casts)
        rebuilt = layer_activation_bytes(dataclasses.replace(job, recompute=None), lay, tokens)
        if job.precision == "bf16-autocast":
            rebuilt += 2 * layer_weights(m) / lay.tp
        moments["last layer recomputed"] = (
            acts - head_saved,
            out_grad,
            gathered + rebuilt + incoming + cp_buffer_bytes(job, lay, tokens),
        )
    moment, (live_acts, grads, transient) = max(moments.items(), key=lambda kv: sum(kv[1]))
    out = {
        "weights": per["weights"] * params,
        "grads": grads,
        "optimizer": per["optimizer"] * params,
        "activations": live_acts,
        "buffers": persistent + transient,
        "baseline": baseline_gib * GIB,
    }
    out["total"] = sum(out.values())
    out["moment"] = moment
    return out
