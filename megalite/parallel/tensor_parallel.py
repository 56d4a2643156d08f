"""Tensor-parallel layers (Megatron-LM layouts) and vocabulary-parallel cross entropy.

Layout: activations are ``[seq, batch, hidden]``. With ``sequence_parallel`` the activation
between layers is this rank's sequence shard ``[s/p, b, h]``: a column-parallel layer
all-gathers it along dim 0, a row-parallel layer (and the embedding) reduce-scatters back.

Weight layouts over a TP group of size p, rank r (the same as Megatron-LM, so a rank's
weight is a contiguous slice of the dense weight):

- ColumnParallelLinear: ``weight`` [out/p, in] = rows [r*out/p, (r+1)*out/p) of the dense
  weight, ``bias`` [out/p]; both sharded.
- RowParallelLinear: ``weight`` [out, in/p] = that block of columns; ``bias`` [out] replicated,
  added after the reduction.
- VocabParallelEmbedding: ``weight`` [V/p, h] = vocabulary rows [vocab_start, vocab_end).

A sharded parameter carries the dim it is split along, ``p.tp_split_dim`` (an int; read it
with ``split_dim``). It is the one record of the layout: the checkpoint's partition map, the
gradient norm (shards summed over TP) and apply_tp's choice of sequence-parallel hooks all
derive from it, so a new sharded layer only has to set it. A replicated parameter whose
gradient only sees this rank's sequence shard (the row-parallel bias under sequence
parallel) gets its gradient summed over the group by ``all_reduce_grad_hook`` and carries
``p.sequence_parallel = True``.

Also here: ``SequenceScatteredEmbedding`` (a replicated table whose output is this rank's
sequence shard) and ``PerRankDropoutAttention`` (attention dropout drawn per TP rank).

``from_dense`` builds each layer from the matching single-device module by slicing its
weights, so a TP model equals the dense model built with the same seed.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .comm import (
    all_reduce,
    all_reduce_grad_hook,
    copy_to_region,
    gather_along_sequence,
    gather_last_dim,
    reduce_from_region,
    reduce_scatter_along_sequence,
    scatter_last_dim,
    scatter_to_sequence,
)


def split_dim(param: torch.Tensor) -> int | None:
    """The dim along which ``param`` is sharded over TP (its ``tp_split_dim``), None when replicated."""
    dim = getattr(param, "tp_split_dim", None)
    if dim is not None and not (isinstance(dim, int) and 0 <= dim < param.dim()):
        raise ValueError(
            f"tp_split_dim {dim!r} of a parameter of shape {tuple(param.shape)} is not one of "
            f"its dims; set it to the int dim the shards split"
        )
    return dim


def enter_region(x: torch.Tensor, group, sequence_parallel: bool) -> torch.Tensor:
    """The input collective of column-parallel layers.
    forward: identity, or with sequence_parallel all-gather along dim 0 /
    backward: all-reduce, or with sequence_parallel reduce-scatter along dim 0."""
    return gather_along_sequence(x, group) if sequence_parallel else copy_to_region(x, group)


def _divide(n: int, p: int, what: str) -> int:
    if n % p:
        raise ValueError(f"{what} ({n}) is not divisible by the tensor-parallel size {p}")
    return n // p


def _shard(t: torch.Tensor, dim: int, group) -> nn.Parameter:
    """This rank's contiguous block of ``t`` along ``dim``, as a fresh parameter."""
    block = t.detach().chunk(dist.get_world_size(group), dim=dim)[dist.get_rank(group)]
    return nn.Parameter(block.clone(), requires_grad=t.requires_grad)


class _ParallelLinear(nn.Module):
    weight_split_dim: int  # dim of the dense [out, in] weight that is sharded

    def __init__(self, in_features, out_features, *, group, bias, sequence_parallel, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group, self.sequence_parallel = group, sequence_parallel
        shape = [out_features, in_features]
        shape[self.weight_split_dim] = _divide(
            shape[self.weight_split_dim],
            dist.get_world_size(group),
            f"{type(self).__name__} {('out', 'in')[self.weight_split_dim]}_features",
        )
        bound = 1 / math.sqrt(in_features)  # nn.Linear's default init, over the full fan-in
        self.weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype).uniform_(-bound, bound))
        self.bias = (
            nn.Parameter(torch.empty(shape[0], device=device, dtype=dtype).uniform_(-bound, bound)) if bias else None
        )
        self._mark_params()

    def _mark_params(self):
        self.weight.tp_split_dim = self.weight_split_dim
        if self.bias is None:
            return
        if self.weight_split_dim == 0:
            self.bias.tp_split_dim = 0
        elif self.sequence_parallel:
            all_reduce_grad_hook(self.bias, self.group)

    @classmethod
    def from_dense(cls, linear: nn.Linear, group, **kwargs):
        """Build from a dense ``nn.Linear`` by slicing its weight (and bias) for this rank."""
        layer = cls(
            linear.in_features,
            linear.out_features,
            group=group,
            bias=linear.bias is not None,
            device="meta",
            dtype=linear.weight.dtype,
            **kwargs,
        )
        layer.weight = _shard(linear.weight, cls.weight_split_dim, group)
        if linear.bias is not None:
            layer.bias = (
                _shard(linear.bias, 0, group)
                if cls.weight_split_dim == 0
                else nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
            )
        layer._mark_params()
        return layer

    def extra_repr(self):
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"local_weight={tuple(self.weight.shape)}, bias={self.bias is not None}, "
            f"sequence_parallel={self.sequence_parallel}"
        )


class ColumnParallelLinear(_ParallelLinear):
    """``y = x W^T + b`` with W split by output features (rows).

    Input: replicated ``[..., in]``, or with ``sequence_parallel`` this rank's sequence shard
    ``[s/p, b, in]`` (all-gathered along dim 0 first). Output: this rank's ``[..., out/p]``,
    or all ``[..., out]`` with ``gather_output``.

    ``skip_input_comm``: the caller already brought the input into the TP region with
    ``enter_region`` (so it is the full replicated input), letting several column layers that
    read one input share one collective, as SwiGLU's gate and fc1 do.
    """

    weight_split_dim = 0

    def __init__(
        self,
        in_features,
        out_features,
        *,
        group,
        bias=True,
        gather_output=False,
        sequence_parallel=False,
        skip_input_comm=False,
        device=None,
        dtype=None,
    ):
        super().__init__(
            in_features,
            out_features,
            group=group,
            bias=bias,
            sequence_parallel=sequence_parallel,
            device=device,
            dtype=dtype,
        )
        self.gather_output, self.skip_input_comm = gather_output, skip_input_comm

    def forward(self, x):
        if not self.skip_input_comm:
            x = enter_region(x, self.group, self.sequence_parallel)
        y = F.linear(x, self.weight, self.bias)
        return gather_last_dim(y, self.group) if self.gather_output else y


class RowParallelLinear(_ParallelLinear):
    """``y = x W^T + b`` with W split by input features (columns).

    Input: this rank's ``[..., in/p]`` (``input_is_parallel``, the output of a column-parallel
    layer) or a replicated ``[..., in]`` that is split here. Output: the sum over ranks,
    replicated ``[..., out]``, or with ``sequence_parallel`` this rank's sequence shard
    ``[s/p, b, out]`` (reduce-scattered along dim 0). The bias is added after the reduction.
    """

    weight_split_dim = 1

    def __init__(
        self,
        in_features,
        out_features,
        *,
        group,
        bias=True,
        input_is_parallel=True,
        sequence_parallel=False,
        device=None,
        dtype=None,
    ):
        if sequence_parallel and not input_is_parallel:
            raise ValueError(
                "RowParallelLinear: sequence_parallel needs input_is_parallel=True "
                "(its input comes from a column-parallel layer)"
            )
        super().__init__(
            in_features,
            out_features,
            group=group,
            bias=bias,
            sequence_parallel=sequence_parallel,
            device=device,
            dtype=dtype,
        )
        self.input_is_parallel = input_is_parallel

    def forward(self, x):
        if not self.input_is_parallel:
            x = scatter_last_dim(x, self.group)
        return self.finish(F.linear(x, self.weight))

    def finish(self, y):
        """After the matmul: sum the partial outputs over ranks, add the bias (model.py's
        FinishedLinear seam: a sequence-tiled MLP runs the matmul per tile, this once)."""
        y = (
            reduce_scatter_along_sequence(y, self.group)
            if self.sequence_parallel
            else reduce_from_region(y, self.group)
        )
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocabulary split into contiguous row blocks.

    Each rank looks up the ids in [vocab_start, vocab_end), writes zeros for the others, and
    the partial rows are summed over the group: an all-reduce giving ``[s, b, h]``, or with
    ``sequence_parallel`` a reduce-scatter along dim 0 giving ``[s/p, b, h]`` (so the ids
    must be ``[s, b]``, sequence first).
    """

    def __init__(self, num_embeddings, embedding_dim, *, group, sequence_parallel=False, device=None, dtype=None):
        super().__init__()
        per_rank = _divide(num_embeddings, dist.get_world_size(group), "VocabParallelEmbedding num_embeddings")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.group, self.sequence_parallel = group, sequence_parallel
        self.vocab_start = dist.get_rank(group) * per_rank
        self.vocab_end = self.vocab_start + per_rank
        self.weight = nn.Parameter(torch.empty(per_rank, embedding_dim, device=device, dtype=dtype).normal_())
        self.weight.tp_split_dim = 0

    @classmethod
    def from_dense(cls, embedding: nn.Embedding, group, *, sequence_parallel=False):
        """Build from a dense ``nn.Embedding`` by slicing this rank's vocabulary rows."""
        if embedding.padding_idx is not None or embedding.max_norm is not None:
            raise ValueError("VocabParallelEmbedding.from_dense: padding_idx / max_norm are not supported")
        layer = cls(
            embedding.num_embeddings,
            embedding.embedding_dim,
            group=group,
            sequence_parallel=sequence_parallel,
            device="meta",
            dtype=embedding.weight.dtype,
        )
        layer.weight = _shard(embedding.weight, 0, group)
        layer.weight.tp_split_dim = 0
        return layer

    def forward(self, ids):
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        out = F.embedding((ids - self.vocab_start).masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_along_sequence(out, self.group)
        return reduce_from_region(out, self.group)

    def extra_repr(self):
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, vocab=[{self.vocab_start}, {self.vocab_end}), "
            f"sequence_parallel={self.sequence_parallel}"
        )


class SequenceScatteredEmbedding(nn.Embedding):
    """An nn.Embedding whose [s, b, h] output is split to this rank's sequence shard.
    forward: lookup then split along dim 0 / backward: all-gather along dim 0, so every rank
    gets the full (identical) table gradient."""

    @classmethod
    def from_dense(cls, embedding: nn.Embedding, group):
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, device="meta")
        layer.weight = embedding.weight  # same parameter: replicated, not re-initialised
        layer.group = group
        return layer

    def forward(self, ids):
        return scatter_to_sequence(super().forward(ids), self.group)


class PerRankDropoutAttention(nn.Module):
    """Core attention with a dropout stream per TP rank. Each rank holds different heads, so the
    replicated stream (which hidden dropout needs) would repeat masks across heads. The seed is
    drawn from the shared stream, so it is equal on all TP ranks before the offset and replayed
    exactly when activation recompute restores the RNG state."""

    def __init__(self, inner: nn.Module, tp_rank: int):
        super().__init__()
        self.inner, self.tp_rank = inner, tp_rank

    def forward(self, q, k, v, document_ids=None):
        if not self.training:
            return self.inner(q, k, v, document_ids)
        seed = int(torch.randint(0, 2**62, (1,))) + self.tp_rank
        with torch.random.fork_rng(devices=[q.device] if q.is_cuda else []):
            torch.default_generator.manual_seed(seed)
            if q.is_cuda:
                torch.cuda.manual_seed(seed)
            return self.inner(q, k, v, document_ids)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, ignore_index):
        v_local = logits.shape[-1]
        start = dist.get_rank(group) * v_local
        x = logits.float()  # [..., V/p]; fp32 like the dense model's loss
        x = x - all_reduce(x.max(dim=-1).values, group, op=dist.ReduceOp.MAX).unsqueeze(-1)
        ignored = target == ignore_index
        local_t = target - start
        outside = (local_t < 0) | (local_t >= v_local) | ignored
        local_t = local_t.masked_fill(outside, 0)
        picked = x.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        exp = x.exp_()
        # One all-reduce for both sums: [2, ...] = (target logit, sum of exp).
        picked, sum_exp = all_reduce(torch.stack([picked, exp.sum(dim=-1)]), group).unbind(0)
        loss = (sum_exp.log() - picked).masked_fill(ignored, 0.0)
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local_t, outside, ignored)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_t, outside, ignored = ctx.saved_tensors
        # d loss / d logits = softmax - onehot(target), zero for ignored tokens.
        grad = softmax.scatter_add(-1, local_t.unsqueeze(-1), -(~outside).to(softmax.dtype).unsqueeze(-1))
        grad = grad * grad_loss.masked_fill(ignored, 0.0).unsqueeze(-1)
        return grad.to(ctx.logits_dtype), None, None, None


def vocab_parallel_cross_entropy(
    logits_shard: torch.Tensor, target: torch.Tensor, group, ignore_index: int = -100
) -> torch.Tensor:
    """Per-token cross entropy of vocabulary-sharded logits, never gathering the full vocab.

    ``logits_shard`` [..., V/p] holds this rank's contiguous vocab block (rank r: columns
    [r*V/p, (r+1)*V/p)); ``target`` [...] holds global token ids. Returns the fp32 loss [...],
    0 where ``target == ignore_index`` (multiply by a loss mask as usual). Communication: two
    all-reduces of [...]-sized tensors (the max, then target logit and sum of exponentials).
    forward: all-reduce / backward: none (each rank's logit gradient is local).
    """
    return _VocabParallelCrossEntropy.apply(logits_shard, target, group, ignore_index)
