"""The two other context-parallel attentions behind --cp-comm-type, same contract as
``ring_attention``: q (B, s, H, D), k/v (B, s, G, D) hold this rank's zigzag pair; the result
(B, s, H, D) equals exact attention over the whole sequence.

all_gather (Llama 3): every rank gathers the K/V of the whole sequence (only G heads travel),
  puts it in natural order, and its two query chunks attend to their prefixes. Each query chunk
  j (c tokens) makes two blocks: full attention to keys [0, j*c) and causal attention to chunk j
  itself (a square, so the causal mask is unambiguous), merged by log-sum-exp. The zigzag pair
  keeps the work even: chunk r plus chunk 2*CP-1-r always see 2*CP chunks' worth of keys.
  forward: all-gather K/V / backward: all-gather K/V again (not kept: saves memory),
  reduce-scatter dK/dV in fp32.

a2a (Ulysses): an all-to-all trades the sequence split for a head split: each rank gets the
  whole sequence for H/CP query heads and G/CP KV heads, runs ordinary causal attention, and a
  second all-to-all trades back. Needs H and G divisible by CP.
  forward: all-to-all q/k/v (one message), all-to-all out / backward: the same, reversed.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..ops.attention import block_attention
from .comm import all_gather_flat, reduce_scatter_flat
from .context_parallel import zigzag_merge, zigzag_split
from .ring_attention import load_block_state, merge_partial, resolve_call, save_block_state


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
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
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
            bq, bk, bv = backend.backward(dout[:, qs], q[:, qs], kf[:, ks], vf[:, ks], out[:, qs],
                                          lse[:, :, qs].contiguous(), blk_causal, scale)
            dq[:, qs] += bq
            dkv[0][:, ks] += bk
            dkv[1][:, ks] += bv
        # Back to rank order (each rank's zigzag pair contiguous), then sum over ranks.
        per_rank = torch.stack([zigzag_split(dkv, 2, cp, j) for j in range(cp)])  # (CP, 2, B, s, G, D)
        mine = torch.empty(per_rank.shape[1:], dtype=dkv.dtype, device=dkv.device)
        reduce_scatter_flat(mine.view(-1), per_rank.view(-1), group=group)
        return dq.to(q.dtype), mine[0].to(k.dtype), mine[1].to(v.dtype), None, None, None, None


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


def ulysses_attention(q, k, v, group, *, causal: bool = True, softmax_scale: float | None = None,
                      backend="auto"):
    """Ulysses (all-to-all) context-parallel attention; H and G must be divisible by CP."""
    scale, backend = resolve_call(q, k, v, group, causal, softmax_scale, backend)
    cp = dist.get_world_size(group)
    b, s, h, d = q.shape
    g = k.shape[2]
    if h % cp or g % cp:
        raise ValueError(f"--cp-comm-type a2a needs query heads ({h}) and kv heads ({g}) divisible by "
                         f"the context-parallel size {cp}; use p2p or all_gather")
    # One message: for each destination rank, its q heads then its k and v heads.
    qkv = torch.cat([t.reshape(b, s, cp, -1, d) for t in (q, k, v)], dim=3).flatten(2, 3)
    qkv = zigzag_merge(_AllToAll.apply(qkv, group, True), 1, cp)  # (B, S, (H + 2G)/CP, D), natural order
    qh, kh, vh = qkv.split([h // cp, g // cp, g // cp], dim=2)
    out = block_attention(qh, kh, vh, causal=causal, softmax_scale=scale, backend=backend)
    out = torch.cat([zigzag_split(out, 1, cp, j) for j in range(cp)], dim=1)  # rank order
    return _AllToAll.apply(out, group, False)


def all_gather_attention(q, k, v, group, *, causal: bool = True, softmax_scale: float | None = None,
                         backend="auto"):
    """Llama 3 style context-parallel attention: all-gather K/V, reduce-scatter dK/dV."""
    scale, backend = resolve_call(q, k, v, group, causal, softmax_scale, backend)
    return _AllGatherAttention.apply(q, k, v, group, causal, scale, backend)
