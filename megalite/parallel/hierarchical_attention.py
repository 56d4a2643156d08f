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

forward: all-to-all q/k/v (inner), P-1 K/V ring hops (outer), all-to-all out (inner) /
backward: all-to-all dout, the ring's backward (P-1 K/V + P-1 dK/dV hops), all-to-all dq/dk/dv.
"""

from __future__ import annotations

import torch.distributed as dist

from .cp_blocks import resolve_call
from .ring_attention import ring_attention
from .ulysses_attention import head_parallel


def hierarchical_attention(
    q, k, v, groups, *, causal: bool = True, softmax_scale: float | None = None, backend="auto", document_ids=None
):
    """``groups`` = (inner all-to-all group of A ranks, outer ring group of P ranks); H must be
    divisible by A, and G divisible by A or dividing it. ``document_ids`` must be None for now."""
    if document_ids is not None:
        # Would need the ids gathered over the all-to-all group, then the ring's document plans.
        raise NotImplementedError(
            "packed-document attention (document_ids) is not supported with --cp-comm-type a2a+p2p yet; "
            "use --cp-comm-type p2p, all_gather or a2a"
        )
    inner, outer = groups
    scale, backend = resolve_call(q, k, v, inner, causal, softmax_scale, backend)
    a, g = dist.get_world_size(inner), k.shape[2]
    if g % a and a % g == 0:
        k, v = (t.repeat_interleave(a // g, dim=2) for t in (k, v))  # (B, s, A, D)

    def attend(qh, kh, vh):  # (B, A*s, H/A or G/A, D): the group's zigzag pair
        return ring_attention(qh, kh, vh, outer, causal=causal, softmax_scale=scale, backend=backend)

    fix = "--hierarchical-context-parallel-sizes A P needs them divisible by A (or kv heads dividing A)"
    return head_parallel(q, k, v, inner, attend, a, fix)
