"""All-gather context-parallel attention (Llama 3), ``--cp-comm-type all_gather``. Same contract
as ``ring_attention``: q (B, s, H, D), k/v (B, s, G, D) hold this rank's zigzag pair; the result
(B, s, H, D) equals exact attention over the whole sequence.

Every rank gathers the K/V of the whole sequence (only G heads travel), puts it in natural
order, and its two query chunks attend to their prefixes. Each query chunk j (c tokens) makes
two blocks: full attention to keys [0, j*c) and causal attention to chunk j itself (a square, so
the causal mask is unambiguous), merged by log-sum-exp. The zigzag pair keeps the work even:
chunk r plus chunk 2*CP-1-r always see 2*CP chunks' worth of keys.

Packed documents (``document_ids``): the blocks become the doc_attention plan of the local
query runs against the gathered sequence's document runs (earlier part of the query's document
as one rectangle, its own positions as a causal square); other documents cost nothing.

forward: all-gather K/V (and the ids) / backward: all-gather K/V again (not kept: saves memory),
reduce-scatter dK/dV in fp32.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..ops.doc_attention import WHOLE, Pair, document_spans, plan_pairs, run_backward, run_forward
from .comm import all_gather_flat, reduce_scatter_flat
from .cp_blocks import gather_document_ids, load_block_state, resolve_call, save_block_state
from .zigzag import zigzag_merge, zigzag_pieces, zigzag_split


def _gather_kv(k, v, group):
    """(B, s, G, D) pair per rank -> (2, B, CP*s, G, D) stacked K/V of the whole sequence, natural order."""
    cp = dist.get_world_size(group)
    kv = torch.stack([k, v])  # (2, B, s, G, D)
    flat = torch.empty(cp * kv.numel(), dtype=kv.dtype, device=kv.device)
    all_gather_flat(flat, kv.view(-1), group=group)
    return zigzag_merge(list(flat.view(cp, *kv.shape).unbind(0)), dim=2)


def all_gather_plan(cp: int, rank: int, local_len: int, causal: bool, ids=None) -> list[Pair]:
    """Kernel calls of ``rank``'s queries against the gathered K/V (natural order); with the
    sample's document ids ``ids`` (B, S), natural order, only the visible document runs."""
    s = local_len
    if ids is not None:
        mine = document_spans(zigzag_split(ids, 1, cp, rank), zigzag_pieces(s, cp, rank))
        return plan_pairs(mine, document_spans(ids, [(0, cp * s, 0)]), causal)
    if not causal:
        return [Pair(WHOLE, WHOLE, WHOLE, False)]
    plan, half = [], s // 2
    for qs, j in ((slice(0, half), rank), (slice(half, None), 2 * cp - 1 - rank)):
        if j:  # keys of every earlier chunk, unmasked
            plan.append(Pair(WHOLE, qs, slice(0, j * half), False))
        plan.append(Pair(WHOLE, qs, slice(j * half, (j + 1) * half), True))
    return plan


class _AllGatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, plan, scale, backend):
        kf, vf = _gather_kv(k, v, group).unbind(0)
        out, lse = run_forward(backend, q, kf, vf, plan, scale)
        return save_block_state(ctx, q, k, v, out, lse, (group, plan, scale, backend))

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, group, plan, scale, backend = load_block_state(ctx)
        cp = dist.get_world_size(group)
        kf, vf = _gather_kv(k, v, group).unbind(0)
        dq = torch.zeros_like(q, dtype=lse.dtype)
        dkv = torch.zeros((2, *kf.shape), dtype=lse.dtype, device=q.device)  # whole sequence, natural order
        run_backward(backend, dout.contiguous(), q, kf, vf, out, lse, plan, scale, dq, dkv[0], dkv[1])
        # Back to rank order (each rank's zigzag pair contiguous), then sum over ranks.
        per_rank = torch.stack([zigzag_split(dkv, 2, cp, j) for j in range(cp)])  # (CP, 2, B, s, G, D)
        mine = torch.empty(per_rank.shape[1:], dtype=dkv.dtype, device=dkv.device)
        reduce_scatter_flat(mine.view(-1), per_rank.view(-1), group=group)
        return dq.to(q.dtype), mine[0].to(k.dtype), mine[1].to(v.dtype), None, None, None, None


def all_gather_attention(
    q, k, v, group, *, causal: bool = True, softmax_scale: float | None = None, backend="auto", document_ids=None
):
    """Llama 3 style context-parallel attention: all-gather K/V, reduce-scatter dK/dV.
    ``document_ids`` as in ``ring_attention``."""
    scale, backend = resolve_call(q, k, v, group, causal, softmax_scale, backend)
    ids = None if document_ids is None else gather_document_ids(document_ids, q, group)
    plan = all_gather_plan(dist.get_world_size(group), dist.get_rank(group), q.shape[1], causal, ids)
    return _AllGatherAttention.apply(q, k, v, group, plan, scale, backend)
