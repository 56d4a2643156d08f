"""Data parallel over the flattened DP x CP group, on torch FSDP2 (the one gradient path).

What FSDP2 does for us: shard parameters, gradients and optimizer state on dim 0 (on top of
the TP shard a rank already holds), all-gather parameters before they are used, reduce
gradients, keep bf16 compute copies of fp32 masters (``MixedPrecisionPolicy``), prefetch.
What we add, and why:

- SUM reduction: the loop divides the loss by the global token count, so gradients must add
  over DP x CP; FSDP2 averages unless told a divide factor of 1 with SUM-only collectives
  (gloo has no PREMUL_SUM).
- Tags: FSDP2 replaces every parameter with a DTensor, dropping attributes; ``tp_split_dim``
  (the TP layout) and ``sequence_parallel`` are copied onto the new parameters.
- Sequence-parallel gradient sums: FSDP2 computes with new unsharded parameters, so the
  gradient hooks apply_tp put on the originals never fire; ``finish_grads`` adds the TP
  partial gradients after the reduction instead (a sum commutes with the reduce-scatter).

When FSDP2 wraps the model: whenever it has work, i.e. DP x CP > 1 (gradients to reduce) or
--bf16 (bf16 compute parameters over fp32 masters; on one rank a mesh of size 1). A single
DP x CP rank in fp32 runs the plain model.

Buckets: without --overlap-grad-reduce the whole model is one FSDP unit (one gather before
the forward, one reduction after the backward). With it, each run of whole transformer layers
of at most --ddp-bucket-size parameters (default one layer) is a unit, reduced as soon as its
backward is done; the root unit holds embedding, final norm and output layer (tied weights
must share a unit). --overlap-param-gather adds explicit forward prefetch of the next unit.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from ..config import Config
from .dims import ParallelDims
from .sharding import strategy

_TAGS = ("tp_split_dim", "sequence_parallel")
# GPT returns its per-token loss transposed (a view); the loop never writes to it in place, the
# one thing the warning is about.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPGPT\) returned a view tensor")


def needs_fsdp(dims: ParallelDims, cfg: Config) -> bool:
    return dims.dp * dims.cp > 1 or cfg.train.bf16


def _mesh(dims: ParallelDims, kind: str, device: torch.device) -> DeviceMesh:
    """1-D mesh over this rank's DP x CP group; for no_shard a (d, 1) mesh, whose size-1 shard dim
    makes FSDP2 replicate and all-reduce (HSDP with nothing to shard)."""
    if kind != "no_shard":
        return DeviceMesh.from_group(dims.dp_cp_group, device.type)
    ranks = dist.get_process_group_ranks(dims.dp_cp_group)
    single = dist.new_subgroups_by_enumeration([[r] for r in range(dims.world_size)])[0]
    return DeviceMesh.from_group(
        [dims.dp_cp_group, single],
        device.type,
        mesh=torch.tensor(ranks).view(-1, 1),
        mesh_dim_names=("replicate", "shard"),
    )


def _units(model, cfg: Config) -> list[list[torch.nn.Module]]:
    """Runs of whole layers of at most --ddp-bucket-size parameters (one layer each by default)."""
    limit = cfg.parallel.ddp_bucket_size or 1
    units, size = [], 0
    for layer in model.layers:
        n = sum(p.numel() for p in layer.parameters())
        if units and size + n <= limit:
            units[-1].append(layer)
            size += n
        else:
            units.append([layer])
            size = n
    return units


def apply_dp(model: torch.nn.Module, dims: ParallelDims, cfg: Config, device: torch.device) -> torch.nn.Module:
    """Wrap ``model`` (already TP/CP-parallel and on ``device``) with FSDP2 over DP x CP, in place."""
    if not needs_fsdp(dims, cfg):
        return model
    p, kind = cfg.parallel, strategy(cfg.parallel)
    tags = {n: {t: getattr(q, t) for t in _TAGS if hasattr(q, t)} for n, q in model.named_parameters()}
    bf16 = cfg.train.bf16
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if bf16 else None,
        reduce_dtype=torch.float32 if bf16 and p.accumulate_allreduce_grads_in_fp32 else None,
        cast_forward_inputs=False,  # RoPE tables and the residual stream keep the dtypes the model gives them
    )
    opts = dict(mesh=_mesh(dims, kind, device), mp_policy=policy, reshard_after_forward=kind == "optim_grads_params")
    units = []
    if p.overlap_grad_reduce:
        units = [fully_shard(run if len(run) > 1 else run[0], **opts) for run in _units(model, cfg)]
    fully_shard(model, **opts)
    for unit in [*units, model]:  # each unit reduces its own gradients
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    if p.overlap_param_gather:
        for a, b in zip(units, units[1:]):
            a.set_modules_to_forward_prefetch([b])
    for n, q in model.named_parameters():
        for t, v in tags[n].items():
            setattr(q, t, v)
    return model


def grad_sync(model, cfg: Config, last: bool) -> None:
    """Before each micro-batch. no_shard (the (d, 1) mesh) all-reduces only after the last one, as
    DDP's no_sync, still accumulating in the reduce dtype (fp32 under --bf16); the sharded
    strategies reduce-scatter every micro-batch, so no rank holds a full gradient between them."""
    if isinstance(model, FSDPModule) and strategy(cfg.parallel) == "no_shard":
        model.set_requires_all_reduce(last)


def reshard(model) -> None:
    """Free gathered parameters a forward without backward (evaluation) left behind, so that the
    registered parameters are this rank's pieces again (what checkpoints and clipping read)."""
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def is_dp_sharded(p: torch.Tensor) -> bool:
    """Whether ``p`` is split over DP x CP ranks (an FSDP2 DTensor with a Shard over >1 ranks)."""
    if not isinstance(p, DTensor):
        return False
    mesh = p.device_mesh
    return any(isinstance(pl, Shard) and mesh.size(i) > 1 for i, pl in enumerate(p.placements))


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's piece of ``t`` (a DTensor's local shard; a plain tensor as it is)."""
    return t.to_local() if isinstance(t, DTensor) else t


def finish_grads(model, tp_group) -> None:
    """After the backward: sum over TP the (reduced) gradients of sequence-parallel parameters
    that FSDP2 holds, whose apply_tp hooks sat on the replaced parameter objects."""
    for q in model.parameters():
        if q.grad is not None and isinstance(q, DTensor) and getattr(q, "sequence_parallel", False):
            dist.all_reduce(local(q.grad), group=tp_group)
