"""Autograd-aware collectives for tensor and sequence parallelism.

Each public function takes its process group explicitly and documents
``forward: X / backward: Y``; all of them are one autograd Function (``_Pair``) applied with
their forward and backward collective. A size-1 group returns the input unchanged, so one
rank runs the same code path as many.

Layout: activations are ``[seq, batch, hidden]``; the sequence-parallel ops split and join
along dim 0, the tensor-parallel ones along the last dim.

Inputs are never modified in place: autograd may hand the same gradient tensor to several
branches (a residual add does), so every reduction works on its own buffer.

Communication accounting: ``with CommCounter() as c: ...`` records one ``CommRecord`` per
collective issued by this module (forward and backward), with the bytes each rank sends
under a ring algorithm over p ranks, where N is the byte size of the full tensor:
all-gather and reduce-scatter send (p-1)/p * N, all-reduce sends 2 (p-1)/p * N (a
reduce-scatter followed by an all-gather), a local split sends nothing. A counter only
records; it never changes what is computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

# torch >= 2.13 renames the flat collectives; older releases only have the *_tensor names.
all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(frozen=True)
class CommRecord:
    op: str  # "all_reduce" | "all_gather" | "reduce_scatter"
    phase: str  # "forward" | "backward" | "grad" (a replicated parameter's gradient sum)
    world: int  # group size
    tensor_bytes: int  # N: bytes of the full (unsharded) tensor
    sent_bytes: float  # bytes one rank sends under a ring algorithm


@dataclass
class CommCounter:
    """Records every collective this module issues while the ``with`` block is active."""

    records: list = field(default_factory=list)

    def __enter__(self) -> CommCounter:
        _ACTIVE_COUNTERS.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE_COUNTERS.remove(self)

    def sent_bytes(self, phase: str | None = None, op: str | None = None) -> float:
        return sum(
            r.sent_bytes for r in self.records if (phase is None or r.phase == phase) and (op is None or r.op == op)
        )


# Counters only observe; a plain list (not thread-local) so the backward pass, which runs on
# an autograd worker thread for CUDA tensors, is recorded too.
_ACTIVE_COUNTERS: list[CommCounter] = []
_RING_FACTOR = {"all_reduce": 2, "all_gather": 1, "reduce_scatter": 1}


def _record(op: str, phase: str, world: int, full: torch.Tensor | torch.Size, itemsize: int) -> None:
    if not _ACTIVE_COUNTERS:
        return
    n = (full.numel() if isinstance(full, torch.Tensor) else torch.Size(full).numel()) * itemsize
    rec = CommRecord(op, phase, world, n, _RING_FACTOR[op] * (world - 1) / world * n)
    for c in _ACTIVE_COUNTERS:
        c.records.append(rec)


# ---- collectives on fresh buffers (no autograd) ----


def all_reduce(x: torch.Tensor, group, op=dist.ReduceOp.SUM, phase: str = "forward") -> torch.Tensor:
    """Reduce a copy of ``x`` over ``group`` (no autograd); ``x`` itself is left untouched."""
    out = x.clone(memory_format=torch.contiguous_format)
    if dist.get_world_size(group) > 1:
        _record("all_reduce", phase, dist.get_world_size(group), out, out.element_size())
        dist.all_reduce(out, op=op, group=group)
    return out


def _all_gather_dim0(x: torch.Tensor, group, phase: str) -> torch.Tensor:
    """[s, ...] per rank -> [p*s, ...], rank order. gloo needs a flat output buffer."""
    p = dist.get_world_size(group)
    x = x.contiguous()
    out = torch.empty(p * x.numel(), dtype=x.dtype, device=x.device)
    _record("all_gather", phase, p, out, x.element_size())
    all_gather_flat(out, x.view(-1), group=group)
    return out.view(p * x.shape[0], *x.shape[1:])


def _reduce_scatter_dim0(x: torch.Tensor, group, phase: str) -> torch.Tensor:
    """[p*s, ...] on every rank -> sum over ranks of this rank's [s, ...] block."""
    p = dist.get_world_size(group)
    x = x.contiguous()
    out = torch.empty(x.shape[0] // p, *x.shape[1:], dtype=x.dtype, device=x.device)
    _record("reduce_scatter", phase, p, x, x.element_size())
    reduce_scatter_flat(out.view(-1), x.view(-1), group=group)
    return out


def _all_gather_last(x: torch.Tensor, group, phase: str) -> torch.Tensor:
    """[..., n] per rank -> [..., p*n], rank order."""
    parts = _all_gather_dim0(x.unsqueeze(0), group, phase)  # [p, ..., n]
    return torch.cat(parts.unbind(0), dim=-1)


def _split_dim0(x: torch.Tensor, group, phase: str) -> torch.Tensor:
    return x.chunk(dist.get_world_size(group), dim=0)[dist.get_rank(group)].contiguous()


def _split_last(x: torch.Tensor, group, phase: str) -> torch.Tensor:
    return x.chunk(dist.get_world_size(group), dim=-1)[dist.get_rank(group)].contiguous()


def _sum(x: torch.Tensor, group, phase: str) -> torch.Tensor:
    return all_reduce(x, group, phase=phase)


def _identity(x: torch.Tensor, group, phase: str) -> torch.Tensor:
    return x.view_as(x)  # a new autograd view, never the input object itself


class _Pair(torch.autograd.Function):
    """forward: ``fwd(x)`` / backward: ``bwd(grad)``, both over ``group``."""

    @staticmethod
    def forward(ctx, x, group, fwd, bwd):
        ctx.group, ctx.bwd = group, bwd
        return fwd(x, group, "forward")

    @staticmethod
    def backward(ctx, g):
        return ctx.bwd(g, ctx.group, "backward"), None, None, None


def _apply(x, group, fwd, bwd, split_dim=None, name=""):
    p = dist.get_world_size(group)
    if p == 1:
        return x
    if split_dim is not None and x.shape[split_dim] % p:  # checked on every rank, before communicating
        raise ValueError(
            f"{name}: dim {split_dim} of shape {tuple(x.shape)} is not divisible by the "
            f"tensor-parallel size {p}; pad the sequence length (--seq-length) or the "
            f"feature size to a multiple of {p}"
        )
    return _Pair.apply(x, group, fwd, bwd)


# ---- public API ----


def copy_to_region(x: torch.Tensor, group) -> torch.Tensor:
    """Enter a tensor-parallel region with a replicated input.
    forward: identity / backward: all-reduce (sum) over ``group``."""
    return _apply(x, group, _identity, _sum)


def reduce_from_region(x: torch.Tensor, group) -> torch.Tensor:
    """Leave a tensor-parallel region by summing partial results.
    forward: all-reduce (sum) over ``group`` / backward: identity."""
    return _apply(x, group, _sum, _identity)


def scatter_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    """Keep this rank's contiguous block of the last dim.
    forward: split (no communication) / backward: all-gather along the last dim."""
    return _apply(x, group, _split_last, _all_gather_last, -1, "scatter_last_dim")


def gather_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenate every rank's block along the last dim, in rank order.
    forward: all-gather along the last dim / backward: split (keep this rank's block)."""
    return _apply(x, group, _all_gather_last, _split_last)


def gather_along_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """Sequence shards [s/p, b, h] -> full sequence [s, b, h] ahead of a column-parallel layer.
    forward: all-gather along dim 0 / backward: reduce-scatter (sum) along dim 0."""
    return _apply(x, group, _all_gather_dim0, _reduce_scatter_dim0)


def reduce_scatter_along_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """Partial sums [s, b, h] -> this rank's summed sequence shard [s/p, b, h].
    forward: reduce-scatter (sum) along dim 0 / backward: all-gather along dim 0."""
    return _apply(x, group, _reduce_scatter_dim0, _all_gather_dim0, 0, "reduce_scatter_along_sequence")


def scatter_to_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """Replicated [s, b, h] -> this rank's sequence shard [s/p, b, h].
    forward: split along dim 0 (no communication) / backward: all-gather along dim 0."""
    return _apply(x, group, _split_dim0, _all_gather_dim0, 0, "scatter_to_sequence")


def all_reduce_grad_hook(param: torch.nn.Parameter, group) -> None:
    """Sum ``param``'s gradient over ``group`` once per backward pass, before it is
    accumulated into ``.grad`` (so gradient accumulation adds already-summed micro-batch
    gradients). For replicated parameters that only see this rank's sequence shard.
    Marks ``param.sequence_parallel = True``; a second call on the same parameter is a no-op."""
    if dist.get_world_size(group) == 1 or getattr(param, "sequence_parallel", False):
        return
    param.sequence_parallel = True
    param.register_hook(lambda g: all_reduce(g, group, phase="grad"))
