"""All-gather context-parallel attention (Llama 3), ``--cp-comm-type all_gather``. Same contract
as ``ring_attention``: q (B, s, H, D), k/v (B, s, G, D) hold this rank's zigzag pair; the result
(B, s, H, D) equals exact attention over the whole sequence.

Every rank gathers the K/V of the whole sequence (only G heads travel), puts it in natural
order, and its two query chunks attend to their prefixes. Each query chunk j (c tokens) makes
two blocks: full attention to keys [0, j*c) and causal attention to chunk j itself (a square, so
the causal mask is unambiguous), merged by log-sum-exp. The zigzag pair keeps the work even:
chunk r plus chunk 2*CP-1-r always see 2*CP chunks' worth of keys.

forward: all-gather K/V / backward: all-gather K/V again (not kept: saves memory),
reduce-scatter dK/dV in fp32.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..ops.attention import accumulator_dtype
from .comm import all_gather_flat, reduce_scatter_flat
from .cp_blocks import load_block_state, merge_partial, resolve_call, save_block_state
from .zigzag import zigzag_merge, zigzag_split


def _gather_kv(k, v, group):
    """(B, s, G, D) pair per rank -> (2, B, CP*s, G, D) stacked K/V of the whole sequence, natural order."""
    cp = dist.get_world_size(group)
    kv = torch.stack([k, v])  # (2, B, s, G, D)
    flat = torch.empty(cp * kv.numel(), dtype=kv.dtype, device=kv.device)
    all_gather_flat(flat, kv.view(-1), group=group)
    return zigzag_merge(list(flat.view(cp, *kv.shape).unbind(0)), dim=2)


def _blocks(rank: int, cp: int, half: int, causal: bool):
    """(query slice, key slice in natural order, causal, first block of these queries)."""
    if not causal:
        return [(slice(None), slice(None), False, True)]
    plan = []
    for qs, j in ((slice(0, half), rank), (slice(half, None), 2 * cp - 1 - rank)):
        if j:  # keys of every earlier chunk, unmasked
            plan.append((qs, slice(0, j * half), False, True))
        plan.append((qs, slice(j * half, (j + 1) * half), True, not j))
    return plan


class _AllGatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal, scale, backend):
        cp, rank = dist.get_world_size(group), dist.get_rank(group)
        kf, vf = _gather_kv(k, v, group).unbind(0)
        acc = accumulator_dtype(q.dtype)
        out = torch.empty(q.shape, dtype=acc, device=q.device)
        lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=acc, device=q.device)  # (B, H, s)
        for qs, ks, blk_causal, first in _blocks(rank, cp, q.shape[1] // 2, causal):
            block_out, block_lse = backend.forward(q[:, qs], kf[:, ks], vf[:, ks], blk_causal, scale)
            if first:
                out[:, qs], lse[:, :, qs] = block_out, block_lse
            else:
                merge_partial(out[:, qs], lse[:, :, qs], block_out, block_lse)
        return save_block_state(ctx, q, k, v, out, lse, (group, causal, scale, backend))

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, group, causal, scale, backend = load_block_state(ctx)
        cp, rank = dist.get_world_size(group), dist.get_rank(group)
        kf, vf = _gather_kv(k, v, group).unbind(0)
        dout = dout.contiguous()
        dq = torch.zeros_like(q, dtype=lse.dtype)
        dkv = torch.zeros((2, *kf.shape), dtype=lse.dtype, device=q.device)  # whole sequence, natural order
        for qs, ks, blk_causal, _ in _blocks(rank, cp, q.shape[1] // 2, causal):
            bq, bk, bv = backend.backward(
                dout[:, qs], q[:, qs], kf[:, ks], vf[:, ks], out[:, qs], lse[:, :, qs].contiguous(), blk_causal, scale
            )
            dq[:, qs] += bq
            dkv[0][:, ks] += bk
            dkv[1][:, ks] += bv
        # Back to rank order (each rank's zigzag pair contiguous), then sum over ranks.
        per_rank = torch.stack([zigzag_split(dkv, 2, cp, j) for j in range(cp)])  # (CP, 2, B, s, G, D)
        mine = torch.empty(per_rank.shape[1:], dtype=dkv.dtype, device=dkv.device)
        reduce_scatter_flat(mine.view(-1), per_rank.view(-1), group=group)
        return dq.to(q.dtype), mine[0].to(k.dtype), mine[1].to(v.dtype), None, None, None, None


def all_gather_attention(q, k, v, group, *, causal: bool = True, softmax_scale: float | None = None, backend="auto"):
    """Llama 3 style context-parallel attention: all-gather K/V, reduce-scatter dK/dV."""
    scale, backend = resolve_call(q, k, v, group, causal, softmax_scale, backend)
    return _AllGatherAttention.apply(q, k, v, group, causal, scale, backend)
