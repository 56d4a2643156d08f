"""Ulysses context-parallel attention, ``--cp-comm-type a2a``. Same contract as
``ring_attention``: q (B, s, H, D), k/v (B, s, G, D) hold this rank's zigzag pair; the result
(B, s, H, D) equals exact attention over the whole sequence.

An all-to-all trades the sequence split for a head split: each rank gets the whole sequence for
H/CP query heads and G/CP KV heads, runs ordinary causal attention, and a second all-to-all
trades back. Needs H and G divisible by CP. With ``document_ids`` every rank gathers the
sample's ids and its whole-sequence attention runs the doc_attention plan (one call per document).

forward: all-to-all q/k/v (one message), all-to-all out / backward: the same, reversed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..ops.attention import block_attention
from .cp_blocks import gather_document_ids, resolve_call
from .zigzag import zigzag_merge, zigzag_split


class _AllToAll(torch.autograd.Function):
    """to_heads: (B, s, CP*m, D) -> (B, CP*s, m, D), the gathered sequence in rank order;
    otherwise the inverse. forward: all-to-all / backward: the inverse all-to-all."""

    @staticmethod
    def forward(ctx, x, group, to_heads):
        ctx.args = (group, to_heads)
        return _all_to_all(x, group, to_heads)

    @staticmethod
    def backward(ctx, g):
        group, to_heads = ctx.args
        return _all_to_all(g, group, not to_heads), None, None


def _all_to_all(x, group, to_heads):
    cp = dist.get_world_size(group)
    b, s, n, d = x.shape
    if to_heads:  # piece j: my sequence, head group j
        send = x.view(b, s, cp, n // cp, d).permute(2, 0, 1, 3, 4)
    else:  # piece j: sequence part j, my heads
        send = x.view(b, cp, s // cp, n, d).transpose(0, 1)
    send = send.contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    if to_heads:  # recv[j]: rank j's sequence, my heads
        return recv.transpose(0, 1).reshape(b, cp * s, n // cp, d)
    return recv.permute(1, 2, 0, 3, 4).reshape(b, s // cp, cp * n, d)  # recv[j]: my sequence, rank j's heads


def head_parallel(q, k, v, group, attend, inner: int, fix: str):
    """The Ulysses frame: all-to-all q/k/v from a sequence split over ``group`` (n ranks) to a head
    split (H/n query heads, G/n KV heads, the group's whole sequence), ``attend(q, k, v)`` on that,
    all-to-all back. The group's pieces lie as ``zigzag_split(..., inner)`` puts them: inner=1 for
    a whole CP group, inner=n for the all-to-all group of hierarchical CP. ``fix`` ends the error."""
    n = dist.get_world_size(group)
    b, s, h, d = q.shape
    g = k.shape[2]
    if h % n or g % n:
        raise ValueError(f"query heads ({h}) and kv heads ({g}) must be divisible by the all-to-all size {n}; {fix}")
    # One message: for each destination rank, its q heads then its k and v heads.
    qkv = torch.cat([t.reshape(b, s, n, -1, d) for t in (q, k, v)], dim=3).flatten(2, 3)
    qkv = zigzag_merge(_AllToAll.apply(qkv, group, True), 1, n, inner)  # (B, n*s, (H + 2G)/n, D), natural order
    qh, kh, vh = qkv.split([h // n, g // n, g // n], dim=2)
    out = attend(qh, kh, vh)
    out = torch.cat([zigzag_split(out, 1, n, j, inner) for j in range(n)], dim=1)  # rank order
    return _AllToAll.apply(out, group, False)


def ulysses_attention(
    q, k, v, group, *, causal: bool = True, softmax_scale: float | None = None, backend="auto", document_ids=None
):
    """Ulysses (all-to-all) context-parallel attention; H and G must be divisible by CP.
    ``document_ids`` as in ``ring_attention``."""
    scale, backend = resolve_call(q, k, v, group, causal, softmax_scale, backend)
    ids = None if document_ids is None else gather_document_ids(document_ids, q, group)  # natural order

    def attend(qh, kh, vh):
        return block_attention(qh, kh, vh, causal=causal, softmax_scale=scale, backend=backend, document_ids=ids)

    fix = "--cp-comm-type a2a needs them divisible by CP; use p2p or all_gather"
    return head_parallel(q, k, v, group, attend, 1, fix)
