"""Hierarchical context-parallel attention, ``--cp-comm-type a2a+p2p`` with
``--hierarchical-context-parallel-sizes A P`` (CP = A x P). Same contract as ``ring_attention``,
but q (B, s, H, D), k/v (B, s, G, D) hold this rank's piece of the hierarchical zigzag layout
(``zigzag_split(..., inner=A)``); the result (B, s, H, D) equals exact attention over the whole
sequence.

Why two levels: an all-to-all moves every token's q/k/v once whatever the group size, but only
pays off over a fast link; a ring hides its hops behind attention and suits the slow link. So
the A consecutive CP ranks of one node swap their sequence split for a head split (Ulysses),
and the P node groups then run the zigzag ring over their whole pair for H/A heads. The layout
makes the all-to-all's gathered sequence exactly the group's zigzag pair, so both halves are the
existing pieces, composed: no third ring.

GQA with fewer KV heads than A (per TP rank, A a multiple of them): each KV head is repeated
A/G times before the all-to-all, so each rank of the group receives the one KV head its H/A
query heads use; autograd sums the copies' gradients back.

Packed documents: the ids are all-gathered over the A ranks into the group's zigzag pair, and
the ring over the P groups runs its document plans on them (ring_attention's document_ids).

forward: all-to-all q/k/v (inner), P-1 K/V ring hops (outer), all-to-all out (inner) /
backward: all-to-all dout, the ring's backward (P-1 K/V + P-1 dK/dV hops), all-to-all dq/dk/dv.
"""

from __future__ import annotations

import torch.distributed as dist

from .comm import all_gather_flat
from .cp_blocks import resolve_call
from .ring_attention import ring_attention
from .ulysses_attention import head_parallel
from .zigzag import zigzag_merge


def _group_pair_ids(document_ids, inner):
    """The all-to-all group's zigzag pair of document ids (B, A*s), what the ring takes after the
    all-to-all: the ids have no head dim to scatter, so every rank of the group gathers them all.
    forward only: one all-gather of B*s integers over the group."""
    a = dist.get_world_size(inner)
    ids = document_ids.contiguous()
    flat = ids.new_empty(a * ids.numel())
    all_gather_flat(flat, ids.view(-1), group=inner)
    return zigzag_merge(list(flat.view(a, *ids.shape).unbind(0)), 1, inner=a)


def hierarchical_attention(
    q, k, v, groups, *, causal: bool = True, softmax_scale: float | None = None, backend="auto", document_ids=None
):
    """``groups`` = (inner all-to-all group of A ranks, outer ring group of P ranks); H must be
    divisible by A, and G divisible by A or dividing it. ``document_ids`` (B, s) split like q."""
    inner, outer = groups
    scale, backend = resolve_call(q, k, v, inner, causal, softmax_scale, backend)
    a, g = dist.get_world_size(inner), k.shape[2]
    if g % a and a % g == 0:
        k, v = (t.repeat_interleave(a // g, dim=2) for t in (k, v))  # (B, s, A, D)

    def attend(qh, kh, vh):  # (B, A*s, H/A or G/A, D): the group's zigzag pair
        ids = None if document_ids is None else _group_pair_ids(document_ids, inner)
        return ring_attention(qh, kh, vh, outer, causal=causal, softmax_scale=scale, backend=backend, document_ids=ids)

    fix = "--hierarchical-context-parallel-sizes A P needs them divisible by A (or kv heads dividing A)"
    return head_parallel(q, k, v, inner, attend, a, fix)
