"""RoPE inverse frequencies, plain or rescaled for context extension.

Three variants, each numerically the one transformers computes for a Llama config:

- plain: ``1 / base^(2i/d)`` with ``--rotary-base`` (``rope_theta``);
- linear position interpolation (``rope_type: linear``), ``--rotary-seq-len-interpolation-factor F``:
  every frequency divided by F, i.e. positions squeezed by F;
- Llama 3.1 scaling (``rope_type: llama3``), ``--use-rope-scaling``: wavelengths longer than
  ``original / low_freq_factor`` are divided by ``--rope-scaling-factor``, shorter than
  ``original / high_freq_factor`` kept, and the band between blended smoothly.
"""

from __future__ import annotations

import math

import torch

from .config import ConfigError, ModelConfig


def validate_rope(m: ModelConfig) -> None:
    scaled = m.use_rope_scaling or m.rotary_seq_len_interpolation_factor is not None
    if scaled and m.position_embedding_type != "rope":
        raise ConfigError(
            "--use-rope-scaling / --rotary-seq-len-interpolation-factor rescale RoPE, but "
            f"--position-embedding-type is {m.position_embedding_type}; drop them or use rope"
        )
    if m.use_rope_scaling and m.rotary_seq_len_interpolation_factor is not None:
        raise ConfigError(
            "--use-rope-scaling (Llama 3.1) and --rotary-seq-len-interpolation-factor (linear) are two "
            "ways of rescaling RoPE; choose one"
        )
    if m.rotary_seq_len_interpolation_factor is not None and m.rotary_seq_len_interpolation_factor <= 0:
        raise ConfigError(
            f"--rotary-seq-len-interpolation-factor must be > 0 (got {m.rotary_seq_len_interpolation_factor})"
        )
    if m.rotary_base <= 0:
        raise ConfigError(f"--rotary-base must be > 0 (got {m.rotary_base})")
    if m.use_rope_scaling:
        if m.rope_scaling_factor <= 0:
            raise ConfigError(f"--rope-scaling-factor must be > 0 (got {m.rope_scaling_factor})")
        if not 0 < m.rope_scaling_low_freq_factor < m.rope_scaling_high_freq_factor:
            raise ConfigError(
                "--rope-scaling-low-freq-factor must be > 0 and below --rope-scaling-high-freq-factor (got "
                f"{m.rope_scaling_low_freq_factor} and {m.rope_scaling_high_freq_factor})"
            )
        if m.rope_scaling_original_max_position_embeddings < 1:
            raise ConfigError(
                "--rope-scaling-original-max-position-embeddings must be >= 1 "
                f"(got {m.rope_scaling_original_max_position_embeddings})"
            )


def plain_inv_frequencies(dim: int, base: float, device=None) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))


def inv_frequencies(m: ModelConfig, device=None) -> torch.Tensor:
    """fp32 inverse frequencies [head_dim / 2] of the RoPE variant ``m`` selects."""
    inv = plain_inv_frequencies(m.head_dim, m.rotary_base, device)
    if m.rotary_seq_len_interpolation_factor is not None:
        return inv / m.rotary_seq_len_interpolation_factor
    if not m.use_rope_scaling:
        return inv
    factor, low, high = m.rope_scaling_factor, m.rope_scaling_low_freq_factor, m.rope_scaling_high_freq_factor
    original = m.rope_scaling_original_max_position_embeddings
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > original / low, inv / factor, inv)
    smooth = (original / wavelen - low) / (high - low)  # 0 at the low-frequency edge, 1 at the high
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(medium, blended, scaled)
