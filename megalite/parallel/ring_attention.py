"""Zigzag ring attention: exact causal attention over a sequence sharded across a CP group.

Each CP rank holds its zigzag pair of chunks (see zigzag.py): local sequence
[chunk r | chunk 2*CP-1-r], 2c tokens. K/V blocks travel around the ring (rank r sends to r+1,
receives from r-1) with ``batch_isend_irecv``; the next hop is posted before the current block is
computed, so communication hides behind attention. Only the KV heads travel (GQA is never
expanded on the wire).

Forward, ring step i on rank r holds the K/V pair of rank s = r - i (mod CP):
  i = 0   causal attention of the local pair on itself;
  s < r   the incoming chunk s precedes both local chunks, its chunk 2*CP-1-s follows both:
          all 2c local queries attend to the first half (c keys) of the block;
  s > r   neither incoming chunk precedes local chunk r; both precede local chunk 2*CP-1-r:
          the second half (c queries) attends to the whole block (2c keys).
So every step after the first computes exactly one half block (c x 2c): the load balance.
Partial outputs merge through their log-sum-exp in fp32 (ops.doc_attention.merge_partial).

Backward: K/V circulate again. dK/dV of the block held at step i >= 1 rides a second ring
one step behind: rank r adds its part to the partial sum received from r-1 (which held the
same block one step earlier) and passes it on; after the last step the sum arrives at the
block's owner, which adds the part it computed at step 0. Each rank sends CP-1 K/V blocks
forward, CP-1 again backward, and CP-1 dK/dV blocks (fp32), the minimum for a ring.

Packed documents (``document_ids``): each step runs the plan of megalite.ops.doc_attention for
(local pair, incoming pair), built from the gathered ids: only query and key runs of the same
document, only keys at or before the queries. A step whose plan is empty computes nothing (its
K/V still travel on, and its dK/dV partial passes through unchanged).

Communication: forward: CP-1 K/V hops / backward: CP-1 K/V hops + CP-1 dK/dV hops. A size-1
group is plain causal attention. Layout (batch, seq, heads, head_dim) throughout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..ops.doc_attention import WHOLE, Pair, document_spans, plan_pairs, run_backward, run_forward
from .cp_blocks import gather_document_ids, load_block_state, resolve_call, save_block_state
from .zigzag import zigzag_pieces, zigzag_split


def ring_peers(group) -> tuple[int, int]:
    """Global ranks of the next (send to) and previous (receive from) ring neighbours."""
    cp, r = dist.get_world_size(group), dist.get_rank(group)
    return dist.get_global_rank(group, (r + 1) % cp), dist.get_global_rank(group, (r - 1) % cp)


def exchange(sends, recvs, peers, group):
    """Post isend of each tensor in ``sends`` to the next rank and irecv into each buffer of
    ``recvs`` from the previous one, as one batch; returns the requests to wait on. Tags keep
    same-peer messages apart (on CP=2 next and previous are the same rank)."""
    nxt, prev = peers
    ops = [dist.P2POp(dist.isend, t, nxt, group, tag) for tag, t in enumerate(sends)]
    ops += [dist.P2POp(dist.irecv, t, prev, group, tag) for tag, t in enumerate(recvs)]
    return dist.batch_isend_irecv(ops) if ops else []


def _step_slices(step: int, rank: int, causal: bool, half: int):
    """(local query slice, incoming K/V slice) that interact at ring step ``step``."""
    whole = slice(None)
    if not causal or step == 0:
        return whole, whole
    if step <= rank:  # source rank r - step < r: its first chunk precedes both local chunks
        return whole, slice(0, half)
    return slice(half, None), whole  # source > r: only the late local chunk sees it, fully


def ring_plans(cp: int, rank: int, local_len: int, causal: bool, ids=None) -> list[list[Pair]]:
    """The kernel calls of each ring step on ``rank``: whole (half) blocks, or with the sample's
    document ids ``ids`` (B, S) in natural order the visible (query run, key run) pairs of the
    local and incoming zigzag pairs. A pure function (benchmarks count work with it)."""
    if ids is None:
        return [
            [Pair(WHOLE, *_step_slices(step, rank, causal, local_len // 2), causal and step == 0)] for step in range(cp)
        ]
    spans = [document_spans(zigzag_split(ids, 1, cp, j), zigzag_pieces(local_len, cp, j)) for j in range(cp)]
    return [plan_pairs(spans[rank], spans[(rank - step) % cp], causal) for step in range(cp)]


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, plans, scale, backend):
        cp = dist.get_world_size(group)
        peers = ring_peers(group)
        kv = torch.stack([k, v])  # (2, B, S, G, D): one message per hop
        out = lse = None
        for step in range(cp):
            incoming = torch.empty_like(kv) if step + 1 < cp else None
            reqs = exchange([kv], [incoming], peers, group) if incoming is not None else []
            if step == 0:  # step 0 covers every local query (each sees at least itself)
                out, lse = run_forward(backend, q, kv[0], kv[1], plans[0], scale)
            else:
                run_forward(backend, q, kv[0], kv[1], plans[step], scale, acc=(out, lse))
            for req in reqs:
                req.wait()
            kv = incoming
        return save_block_state(ctx, q, k, v, out, lse, (group, plans, scale, backend))

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, group, plans, scale, backend = load_block_state(ctx)
        cp = dist.get_world_size(group)
        peers = ring_peers(group)
        dout = dout.contiguous()
        dq = torch.zeros_like(q, dtype=lse.dtype)
        kv = torch.stack([k, v])
        own = partial = None  # own: this rank's step-0 dK/dV; partial: running sum for the held block
        for step in range(cp):
            sends, recvs = [], []
            if step + 1 < cp:
                sends.append(kv)
                recvs.append(torch.empty_like(kv))
            if step >= 2:  # the partial dK/dV from step - 1 moves on while this step computes
                sends.append(partial)
                recvs.append(torch.empty_like(partial))
            reqs = exchange(sends, recvs, peers, group)
            grads = kv.new_zeros(kv.shape, dtype=lse.dtype)  # this step's dK/dV of the held block
            run_backward(backend, dout, q, kv[0], kv[1], out, lse, plans[step], scale, dq, grads[0], grads[1])
            for req in reqs:
                req.wait()
            if step == 0:
                own = grads
            else:
                partial = recvs[-1].add_(grads) if step >= 2 else grads
            if step + 1 < cp:
                kv = recvs[0]
        if cp > 1:  # last hop: the finished sum reaches its owner (the next rank)
            arrived = torch.empty_like(partial)
            for req in exchange([partial], [arrived], peers, group):
                req.wait()
            own += arrived
        return dq.to(q.dtype), own[0].to(k.dtype), own[1].to(v.dtype), None, None, None, None


def ring_attention(
    q, k, v, group, *, causal: bool = True, softmax_scale: float | None = None, backend="auto", document_ids=None
):
    """Exact attention over a sequence sharded in zigzag order over ``group``.

    q: (batch, local_seq, heads, head_dim); k, v: (batch, local_seq, kv_heads, head_dim), where the
    local sequence is this rank's zigzag pair (``zigzag_split``) and heads % kv_heads == 0.
    Returns (batch, local_seq, heads, head_dim) in q's dtype, differentiable in q, k and v.
    ``causal=False`` is a plain ring over whole blocks (any sharding works then).
    ``backend``: "auto" or a name from megalite.ops.attention (or a backend object).
    ``document_ids`` (batch, local_seq) integers split like q, non-decreasing along the global
    sequence: a query sees only keys of its own document (packed samples).
    Every rank of ``group`` must call it with the same shapes.
    forward: CP-1 K/V ring hops (+ one all-gather of the ids) / backward: CP-1 K/V hops + CP-1
    fp32 dK/dV hops.
    """
    scale, backend = resolve_call(q, k, v, group, causal, softmax_scale, backend)
    ids = None if document_ids is None else gather_document_ids(document_ids, q, group)
    plans = ring_plans(dist.get_world_size(group), dist.get_rank(group), q.shape[1], causal, ids)
    return _RingAttention.apply(q, k, v, group, plans, scale, backend)
