"""Turn a dense megalite GPT into its tensor-parallel (+ Megatron sequence-parallel) form, in place.

What changes on each rank of a TP group of size p (Megatron-LM's layout):

- ``embedding.word`` -> VocabParallelEmbedding (vocabulary padded to a multiple of
  --make-vocab-size-divisible-by x p first); ``output_layer`` -> ColumnParallelLinear over the
  vocabulary, still tied to the embedding unless untied; ``model.vocab_start`` set so the model
  masks padded columns; ``loss_fn`` -> vocab_parallel_cross_entropy (full logits never exist) and
  ``fused_loss_fn`` -> its token-tiled form, vocab_parallel_fused_linear_cross_entropy.
- attention ``qkv`` and MLP ``fc1`` / ``gate`` -> ColumnParallelLinear; ``proj`` and ``fc2`` ->
  RowParallelLinear. The qkv rows are grouped per query group, so a contiguous row block holds
  whole groups, and the model reads its local head count from the weight's shape (nothing to
  edit). The MLP's input collective runs once, in a forward pre-hook (shared by SwiGLU's gate and
  fc1, and ahead of any --mlp-tile-size tiling, which then splits only local work), so a layer
  communicates exactly Megatron's four all-reduces (or their all-gather/reduce-scatter halves
  under SP).

These are the seams model.py's docstring lists; apply_tp touches nothing else on the model.

With ``sequence_parallel`` the activations between the TP regions are this rank's sequence
shard [s/p, b, h]: the embedding reduce-scatters, column layers all-gather along the sequence,
row layers reduce-scatter, the output layer all-gathers, and learned absolute position
embeddings are scattered to the local shard. Norms, dropout and residual adds then run on
the shard, so the replicated parameters other than the position table (norm weights and
biases, row-parallel biases) only see part of the sequence: each gets a gradient hook that
sums its gradient over the TP group once per backward pass, before accumulation into
``.grad`` (so gradient accumulation and recompute keep sum semantics; nothing for the loop
to call). Such parameters carry ``p.sequence_parallel = True``; the hooked set is every
parameter without a ``tp_split_dim`` (see tensor_parallel.py), bar the position table.

Every weight is a slice of the dense model's weight, so a TP model built from the same seed
equals the single-rank model. With attention dropout each TP rank's core attention draws from
its own stream (PerRankDropoutAttention), as Megatron's model-parallel RNG does.
"""

from __future__ import annotations

import functools
import warnings

import torch.distributed as dist
from torch import nn

from ..config import ConfigError, ModelConfig
from .comm import all_reduce_grad_hook
from .tensor_parallel import (
    ColumnParallelLinear,
    PerRankDropoutAttention,
    RowParallelLinear,
    SequenceScatteredEmbedding,
    VocabParallelEmbedding,
    enter_region,
    split_dim,
    vocab_parallel_cross_entropy,
)
from .vocab_parallel_loss import vocab_parallel_fused_linear_cross_entropy


def validate_tp(model_cfg: ModelConfig, tp: int, sequence_parallel: bool, cp: int = 1) -> None:
    """Raise ConfigError when the model cannot be split over ``tp`` ranks (call before any
    collective). Warns that --sequence-parallel is a no-op when tp == 1. ``cp`` is the context
    parallel size: under SP each CP rank's sequence (seq_length / cp) is split over TP."""
    if tp == 1:
        if sequence_parallel:
            warnings.warn("--sequence-parallel has no effect with --tensor-parallel-size 1; ignoring it", stacklevel=2)
        return
    m = model_cfg
    checks = [
        ("--num-attention-heads", m.num_attention_heads),
        ("--num-query-groups" if m.group_query_attention else "--num-attention-heads (query groups)", m.num_kv_heads),
        ("--ffn-hidden-size", m.ffn_size),
    ]
    for flag, value in checks:
        if value % tp:
            raise ConfigError(
                f"{flag} {value} is not divisible by --tensor-parallel-size {tp}; "
                f"choose a tensor-parallel size that divides it"
            )
    if sequence_parallel and m.seq_length % (cp * tp):
        raise ConfigError(
            f"--sequence-parallel splits each rank's sequence (--seq-length {m.seq_length} / CP {cp}) "
            f"over --tensor-parallel-size {tp}; make --seq-length a multiple of {cp * tp}"
        )


def _enter_mlp(module, args, *, group, sequence_parallel):
    """Forward pre-hook of the MLP: its one input collective (shared by SwiGLU's gate and fc1)."""
    return (enter_region(args[0], group, sequence_parallel), *args[1:])


def apply_tp(model: nn.Module, tp_group, sequence_parallel: bool) -> nn.Module:
    """Convert the dense GPT ``model`` in place (on every rank of ``tp_group``) and return it."""
    tp = dist.get_world_size(tp_group)
    validate_tp(model.cfg, tp, sequence_parallel)
    sp = sequence_parallel and tp > 1
    column = functools.partial(ColumnParallelLinear.from_dense, group=tp_group, sequence_parallel=sp)
    row = functools.partial(RowParallelLinear.from_dense, group=tp_group, sequence_parallel=sp)

    model.pad_vocab_to(tp)
    emb = model.embedding
    tied = model.output_layer.weight is emb.word.weight
    emb.word = VocabParallelEmbedding.from_dense(emb.word, tp_group, sequence_parallel=sp)
    if sp and emb.position is not None:
        emb.position = SequenceScatteredEmbedding.from_dense(emb.position, tp_group)

    for block in model.layers:
        attn, mlp = block.attention, block.mlp
        attn.qkv, attn.proj = column(attn.qkv), row(attn.proj)
        if attn.core_attention.dropout > 0:
            attn.core_attention = PerRankDropoutAttention(attn.core_attention, dist.get_rank(tp_group))
        mlp.fc2 = row(mlp.fc2)
        mlp.fc1 = column(mlp.fc1, skip_input_comm=True)
        if mlp.gate is not None:  # SwiGLU: gate and fc1 read one input
            mlp.gate = column(mlp.gate, skip_input_comm=True)
        mlp.register_forward_pre_hook(functools.partial(_enter_mlp, group=tp_group, sequence_parallel=sp))

    out = column(model.output_layer)
    if tied:
        out.weight = emb.word.weight
    model.output_layer = out
    model.vocab_start = emb.word.vocab_start  # the model masks global columns >= vocab_size
    model.loss_fn = functools.partial(vocab_parallel_cross_entropy, group=tp_group)
    model.fused_loss_fn = functools.partial(
        vocab_parallel_fused_linear_cross_entropy, group=tp_group, sequence_parallel=sp
    )

    if sp:
        position = emb.position.weight if emb.position is not None else None
        for p in model.parameters():
            if split_dim(p) is None and p is not position:
                all_reduce_grad_hook(p, tp_group)
    return model
