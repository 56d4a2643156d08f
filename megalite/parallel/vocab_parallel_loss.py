"""The fused, token-tiled output layer + cross entropy (megalite.ops.fused_loss) over a
vocabulary split across the TP group, as the model's ``fused_loss_fn``.

The hidden states enter the TP region first (forward: identity, or under sequence parallel an
all-gather along the sequence / backward: all-reduce, or reduce-scatter), exactly as the
column-parallel output layer's input does; each rank then holds a [chunk, V/p] block of logits at
a time and the per-token max and (target logit, sum of exponentials) are all-reduced per chunk.
forward: 2 all-reduces of [chunk]-sized tensors per chunk / backward: the input collective only
(the gradients are computed in forward, each rank's weight gradient is local).
"""

from __future__ import annotations

import functools

import torch.distributed as dist

from ..ops.fused_loss import fused_linear_cross_entropy
from .comm import all_reduce
from .tensor_parallel import enter_region


def vocab_parallel_fused_linear_cross_entropy(
    hidden, weight, labels, loss_mask, chunk_size, *, vocab_start, vocab_size, group, sequence_parallel
):
    """hidden [s(/p under SP), b, h]; weight this rank's vocabulary rows [V/p, h] from global
    column ``vocab_start``; labels, loss_mask [s, b]. Returns sum(loss * loss_mask), replicated."""
    return fused_linear_cross_entropy(
        enter_region(hidden, group, sequence_parallel),
        weight,
        labels,
        loss_mask,
        chunk_size,
        vocab_start=vocab_start,
        vocab_size=vocab_size,
        reduce_max=functools.partial(all_reduce, group=group, op=dist.ReduceOp.MAX),
        reduce_sum=functools.partial(all_reduce, group=group),
    )
