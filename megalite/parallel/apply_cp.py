"""Context parallel applied from outside the model: each block's ``attention.core_attention``
becomes a ``ContextParallelAttention`` over the CP group.

The data path shards every sequence with ``zigzag_split`` (tokens, shifted labels, loss mask,
position ids), so embeddings, RoPE, norms, MLPs and the loss are per-token and unchanged; only
attention needs the other ranks' tokens. Gradients of the (replicated) weights are partial sums
over this rank's tokens: the training loop sums them over the DP x CP group.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from ..config import ConfigError, ModelConfig
from .all_gather_attention import all_gather_attention
from .hierarchical_attention import hierarchical_attention
from .ring_attention import ring_attention
from .ulysses_attention import ulysses_attention

CP_ATTENTION = {
    "p2p": ring_attention,
    "all_gather": all_gather_attention,
    "a2a": ulysses_attention,
    "a2a+p2p": hierarchical_attention,  # its group is the pair (all-to-all group, ring group)
}


def validate_cp(model_cfg: ModelConfig, cp: int, comm_type: str, tp: int = 1, a2a_size: int | None = None) -> None:
    """Model/CP compatibility, checked before any collective. Raises ConfigError. ``a2a_size``:
    A of --hierarchical-context-parallel-sizes under a2a+p2p."""
    if comm_type not in CP_ATTENTION:
        raise ConfigError(f"--cp-comm-type {comm_type!r} is not one of {sorted(CP_ATTENTION)}")
    if cp == 1:
        return
    seq = model_cfg.seq_length
    if seq % (2 * cp):
        raise ConfigError(
            f"--seq-length {seq} is not divisible by 2 x --context-parallel-size {cp} = {2 * cp}: "
            f"zigzag context parallelism cuts each sequence into 2*CP equal chunks; use a multiple of {2 * cp}"
        )
    if model_cfg.attention_dropout:
        raise ConfigError(
            "--attention-dropout is not supported with context parallelism "
            "(the CP attention kernels run without dropout); set --attention-dropout 0"
        )
    heads, groups = model_cfg.num_attention_heads // tp, model_cfg.num_kv_heads // tp
    if comm_type == "a2a" and (heads % cp or groups % cp):
        raise ConfigError(
            f"--cp-comm-type a2a splits attention heads over CP ranks: query heads per TP rank ({heads}) "
            f"and kv heads per TP rank ({groups}) must both be divisible by --context-parallel-size {cp}; "
            f"use --cp-comm-type p2p or all_gather, or change the head counts"
        )
    if comm_type == "a2a+p2p" and (heads % a2a_size or (groups % a2a_size and a2a_size % groups)):
        raise ConfigError(
            f"--cp-comm-type a2a+p2p splits attention heads over the A = {a2a_size} ranks of an all-to-all "
            f"group: query heads per TP rank ({heads}) must be divisible by A, and kv heads per TP rank "
            f"({groups}) divisible by A or dividing it (then they are repeated); choose another A in "
            f"--hierarchical-context-parallel-sizes, or change the head counts"
        )


class ContextParallelAttention(nn.Module):
    """Drop-in for the model's core attention: q (b, s, h, d), k/v (b, s, g, d) -> (b, s, h, d),
    where s is this rank's zigzag pair; ``document_ids`` (b, s) split the same way, or None.
    Stores the group (for a2a+p2p the pair of groups) it was built with."""

    def __init__(self, group, comm_type: str = "p2p", causal: bool = True, backend: str = "auto"):
        super().__init__()
        if comm_type not in CP_ATTENTION:
            raise ValueError(f"unknown cp comm type {comm_type!r}; choose one of {sorted(CP_ATTENTION)}")
        if (comm_type == "a2a+p2p") != isinstance(group, tuple):
            raise ValueError("a2a+p2p takes the pair (all-to-all group, ring group); the other types one group")
        self.group, self.comm_type, self.causal, self.backend = group, comm_type, causal, backend
        self._attend = CP_ATTENTION[comm_type]

    def forward(self, q, k, v, document_ids=None):
        return self._attend(q, k, v, self.group, causal=self.causal, backend=self.backend, document_ids=document_ids)

    def extra_repr(self) -> str:
        groups = self.group if isinstance(self.group, tuple) else (self.group,)
        sizes = " x ".join(str(dist.get_world_size(g)) for g in groups)
        return f"comm_type={self.comm_type}, cp={sizes}, backend={self.backend}"


def apply_cp(model: nn.Module, cp_group, comm_type: str = "p2p") -> nn.Module:
    """Swap every block's core attention for context-parallel attention over ``cp_group`` (for
    a2a+p2p the pair (all-to-all group, ring group)), in place; returns the model.
    --use-flash-attn makes the flash-attn backend mandatory."""
    backend = "flash_attn" if getattr(model.cfg, "use_flash_attn", False) else "auto"
    for layer in model.layers:
        layer.attention.core_attention = ContextParallelAttention(cp_group, comm_type, backend=backend)
    return model
