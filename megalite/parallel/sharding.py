"""Sharded data parallel: Megatron's flags, what each strategy means here, and their checks.

Strategies shard over the flattened DP x CP group (d ranks) and run on torch FSDP2:

- ``no_shard``: every rank holds full parameters, gradients and optimizer state; gradients
  are summed with an all-reduce (FSDP2 on a (d, 1) mesh, i.e. replicate, shard over 1).
- ``optim``: FSDP2 cannot keep full replicated parameters and gradients while sharding only
  the optimizer state, so ``optim`` runs as ``optim_grads``: it stores less than Megatron's
  ``optim`` and sends the same bytes (a reduce-scatter plus an all-gather is an all-reduce).
- ``optim_grads``: parameters, gradients and optimizer state sharded at rest; parameters are
  all-gathered before the forward and stay gathered until the backward is done
  (``reshard_after_forward=False``): no second gather in the backward.
- ``optim_grads_params``: as ``optim_grads``, but parameters are freed after the forward and
  gathered again in the backward (``reshard_after_forward=True``): least memory.

This module imports no torch, so flags can be checked before anything else runs.
"""

from __future__ import annotations

STRATEGIES = ("no_shard", "optim", "optim_grads", "optim_grads_params")


def strategy(p) -> str:
    """The strategy a ParallelConfig asks for (``--use-distributed-optimizer`` alone: ``optim``)."""
    return p.data_parallel_sharding_strategy or ("optim" if p.use_distributed_optimizer else "no_shard")


def validate_sharding(p) -> None:
    """Flag combinations that cannot work, named with the fix (raises ConfigError)."""
    from ..config import ConfigError

    if p.use_distributed_optimizer and p.data_parallel_sharding_strategy == "no_shard":
        raise ConfigError(
            "--use-distributed-optimizer shards at least the optimizer state but --data-parallel-sharding-strategy "
            "is no_shard; drop one of them, or pick optim, optim_grads or optim_grads_params"
        )
    if p.overlap_param_gather and strategy(p) == "no_shard":
        raise ConfigError(
            "--overlap-param-gather needs sharded parameters to gather: add --use-distributed-optimizer or "
            "--data-parallel-sharding-strategy optim|optim_grads|optim_grads_params, or drop the flag"
        )
    if p.overlap_param_gather and not p.overlap_grad_reduce:
        raise ConfigError(
            "--overlap-param-gather needs --overlap-grad-reduce (as in Megatron-LM): parameters are gathered "
            "per bucket of layers, and buckets exist only with overlapped reduction; add --overlap-grad-reduce"
        )
    if p.ddp_bucket_size is not None:
        if p.ddp_bucket_size < 1:
            raise ConfigError(f"--ddp-bucket-size must be >= 1 parameter (got {p.ddp_bucket_size})")
        if not p.overlap_grad_reduce:
            raise ConfigError(
                "--ddp-bucket-size sets the size of the buckets reduced during the backward; it needs "
                "--overlap-grad-reduce (without it all gradients are reduced at once after the backward)"
            )
