"""The one place that turns the plain model into its parallel form, in a fixed order:

1. tensor parallel (+ sequence parallel): shard linear layers, embedding, output and loss;
2. context parallel: swap each block's core attention for the CP attention of --cp-comm-type;
3. move to the device;
4. data parallel: FSDP2 over the flattened DP x CP group (data_parallel.py), summing gradients
   because the loop normalises the loss by the global token count; with --bf16 it also keeps
   the bf16 compute copies of the fp32 master weights.
Activation recompute is a model option (--recompute-granularity), independent of the layout.
"""

from __future__ import annotations

import torch

from ..config import Config, ConfigError
from ..ops.attention import fused_kernel_fits
from ..ops.offload import validate_offload
from .apply_cp import apply_cp, validate_cp
from .apply_tp import apply_tp, validate_tp
from .data_parallel import apply_dp
from .dims import ParallelDims


def validate_layout(cfg: Config, dims_tp: int, dims_cp: int) -> None:
    """Model/layout/device compatibility, checked before any collective."""
    on_cuda = (cfg.train.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    if cfg.model.use_flash_attn and not on_cuda:
        raise ConfigError(
            "--use-flash-attn needs a CUDA device (flash-attn has no CPU kernels); "
            "drop the flag to run torch's CPU attention kernels"
        )
    validate_offload(cfg.model, on_cuda)
    validate_tp(cfg.model, dims_tp, cfg.parallel.sequence_parallel, cp=dims_cp)
    if dims_cp > 1:
        sizes = cfg.parallel.hierarchical_context_parallel_sizes
        validate_cp(cfg.model, dims_cp, cfg.parallel.cp_comm_type, dims_tp, sizes and sizes[0])
        d = cfg.model.head_dim
        if on_cuda and not fused_kernel_fits(torch.bfloat16 if cfg.train.bf16 else torch.float32, d):
            # fp32 (or odd head dims) would fall back to the math block attention, which holds
            # every block's full score matrix: exactly what long-context training cannot afford.
            raise ConfigError(
                "context parallel on CUDA needs --bf16 and a head dim that is a multiple of 8 "
                f"and <= 256 (got bf16={cfg.train.bf16}, head dim {d}) for the fused attention kernels"
            )


def parallelize(model: torch.nn.Module, dims: ParallelDims, cfg: Config, device: torch.device):
    if dims.tp > 1:
        apply_tp(model, dims.tp_group, dims.sequence_parallel)
    if dims.cp > 1:
        comm = cfg.parallel.cp_comm_type
        group = (dims.cp_a2a_group, dims.cp_ring_group) if comm == "a2a+p2p" else dims.cp_group
        apply_cp(model, group, comm)
    model.to(device)
    return apply_dp(model, dims, cfg, device)
