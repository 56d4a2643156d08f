"""From pretrain.py's configuration (plus planner-only flags) to the planner's Job.

Options other issues add to megalite (sharded data parallel, packed documents, tiled loss and
MLP, offload, hierarchical CP) are modelled here from their specifications. Each is read from
pretrain.py's own configuration once megalite has the flag, and until then is a flag of the
planner alone, so `megalite-plan` accepts it either way and prints only flags pretrain.py has.
"""

from __future__ import annotations

import argparse
import dataclasses

from .. import config as C
from .spec import SHARDING, Job

MODELLED = {
    "--use-distributed-optimizer": {"action": "store_true", "help": "shard the optimizer state (at least optim)"},
    "--data-parallel-sharding-strategy": {"choices": SHARDING, "help": "what DP x CP shards"},
    "--overlap-grad-reduce": {"action": "store_true", "help": "reduce gradients during backward"},
    "--reset-attention-mask": {"action": "store_true", "help": "attention within documents only"},
    "--loss-chunk-size": {"type": int, "default": 0, "help": "fused, token-tiled output layer + loss (0: plain)"},
    "--mlp-tile-size": {"type": int, "default": 0, "help": "sequence-tiled MLP, tokens per tile (0: off)"},
    "--cpu-offloading": {"action": "store_true", "help": "full-recompute inputs in host memory (CUDA)"},
    "--cpu-offloading-num-layers": {"type": int, "help": "layers offloaded (default all but the last)"},
    "--hierarchical-context-parallel-sizes": {"type": int, "nargs": 2, "help": "A P for --cp-comm-type a2a+p2p"},
}


def pretrain_flags() -> set:
    return set(C.build_parser()._option_string_actions)


def megalite_has_fsdp() -> bool:
    """Data parallel runs on FSDP2 (issue 14) once its sharding flag exists: DDP is then gone and
    --bf16 means bf16 compute parameters over fp32 masters."""
    return "--data-parallel-sharding-strategy" in pretrain_flags()


def add_planner_flags(parser: argparse.ArgumentParser) -> None:
    have = pretrain_flags()
    for flag, kw in MODELLED.items():
        if flag not in have:
            parser.add_argument(flag, **kw)


def cfg_value_or_flag(cfg: C.Config, ns, dest: str):
    for section in dataclasses.fields(cfg):
        sec = getattr(cfg, section.name)
        if hasattr(sec, dest):
            return getattr(sec, dest)
    return getattr(ns, dest, None) if ns is not None else None


def job_from(cfg: C.Config, vocab: int, ns=None, doc_length: float | None = None) -> Job:
    """The Job of a parsed configuration; ``ns`` holds the planner-only flags (None in pretrain.py).
    Under --reset-attention-mask without a mean document length attention is counted causal over
    the whole sequence (an upper bound)."""
    m, t = cfg.model, cfg.train
    fsdp = megalite_has_fsdp()
    sharding = cfg_value_or_flag(cfg, ns, "data_parallel_sharding_strategy")
    if sharding is None:
        sharding = "optim" if cfg_value_or_flag(cfg, ns, "use_distributed_optimizer") else "no_shard"
    offload = 0
    if cfg_value_or_flag(cfg, ns, "cpu_offloading"):
        offload = cfg_value_or_flag(cfg, ns, "cpu_offloading_num_layers") or max(m.num_layers - 1, 0)
    hier = cfg_value_or_flag(cfg, ns, "hierarchical_context_parallel_sizes")
    return Job(
        model=m,
        vocab_size=vocab,
        seq_length=m.seq_length,
        global_batch_size=t.global_batch_size or t.micro_batch_size,
        micro_batch_size=t.micro_batch_size,
        precision=("bf16" if fsdp else "bf16-autocast") if t.bf16 else "fp32",
        recompute=m.recompute_granularity,
        sharding=sharding,
        doc_length=doc_length if cfg_value_or_flag(cfg, ns, "reset_attention_mask") else None,
        loss_chunk=cfg_value_or_flag(cfg, ns, "loss_chunk_size") or None,
        mlp_tile=cfg_value_or_flag(cfg, ns, "mlp_tile_size") or 0,
        offload_layers=offload,
        hier_a2a=hier[0] if hier else 0,
        fsdp=fsdp,
        overlap_grad_reduce=bool(cfg_value_or_flag(cfg, ns, "overlap_grad_reduce")) or not fsdp,
    )
