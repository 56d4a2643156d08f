"""Attention over packed documents, without an S x S mask and without wasted block work.

A sample holds several documents; ``document_ids`` (B, S) integers, non-decreasing along the
global sequence, say which. Query i sees key j iff both belong to the same document and, when
causal, j <= i in global position.

Every attention here, single rank or context parallel, is a list of ``Pair``s: one kernel call
each, a (query run, key run) rectangle of one batch row that is either fully visible or a causal
square. ``plan_pairs`` builds the list from ``Span``s: maximal runs of one document that are
contiguous both in local storage and in global position (a zigzag chunk is such a piece). Pairs
of different documents, or keys after every query, are never listed, so no work is spent on them.
The same runner without documents takes a hand-made plan (whole blocks), so there is one
forward/backward loop for every layout.

Partials of one query run merge through their log-sum-exp in the accumulator dtype (fp32, fp64
for fp64 inputs): lse' = logaddexp(lse, lse_b), out' = out - sigmoid(lse_b - lse) * (out - out_b).
Rows no pair covers keep out = 0 and lse = -inf, so a later merge ignores them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .attention import _bhsd, accumulator_dtype


class Span(NamedTuple):
    """Tokens [start, stop) of local storage, all of document ``doc``, at global positions
    [pos, pos + stop - start)."""

    doc: int
    start: int
    stop: int
    pos: int


class Pair(NamedTuple):
    """One kernel call: queries ``q`` of batch ``rows`` against keys ``k``, causal square or full.
    Pairs sharing query rows have identical ``rows`` and ``q`` slices (the merge relies on it)."""

    rows: slice
    q: slice
    k: slice
    causal: bool


WHOLE = slice(None)


def document_spans(ids: torch.Tensor, pieces) -> list[list[Span]]:
    """Per batch row, the runs of one document inside each piece.

    ids: (B, L) integer tensor; pieces: [(start, stop, global_pos)] covering [0, L) in order, each
    contiguous in global position (e.g. the two chunks of a zigzag pair)."""
    ids = ids.cpu()
    edges = sorted({a for a, _, _ in pieces} | {z for _, z, _ in pieces})
    out = []
    for row in ids:
        cuts = sorted(set(edges) | set((row[1:] != row[:-1]).nonzero().flatten().add(1).tolist()))
        values = row.tolist()
        spans, piece = [], 0
        for a, z in zip(cuts[:-1], cuts[1:]):
            while a >= pieces[piece][1]:
                piece += 1
            start, _, pos = pieces[piece]
            spans.append(Span(values[a], a, z, pos + a - start))
        out.append(spans)
    return out


def plan_pairs(q_spans: list[list[Span]], k_spans: list[list[Span]], causal: bool) -> list[Pair]:
    """The kernel calls of a (query block, key block): for each query run, the visible part of
    each key run of its document, as one full rectangle (keys before every query) and/or one
    causal square (the keys at the queries' own positions). Key runs must not start or end
    strictly inside a query run's positions (true when both sides are cut at the same chunk
    boundaries, or the keys hold whole documents)."""
    pairs = []
    for b, (qrow, krow) in enumerate(zip(q_spans, k_spans)):
        by_doc: dict[int, list[Span]] = {}
        for s in krow:
            by_doc.setdefault(s.doc, []).append(s)
        rows = slice(b, b + 1)
        for qs in qrow:
            qa, qb, qsl = qs.pos, qs.pos + qs.stop - qs.start, slice(qs.start, qs.stop)
            for ks in by_doc.get(qs.doc, ()):
                ka, kb = ks.pos, ks.pos + ks.stop - ks.start
                if not causal:
                    pairs.append(Pair(rows, qsl, slice(ks.start, ks.stop), False))
                    continue
                if ka < qa:  # keys before every query of the run: all visible
                    pairs.append(Pair(rows, qsl, slice(ks.start, ks.start + min(kb, qa) - ka), False))
                if kb > qa and ka < qb:  # keys among the queries' own positions
                    if ka > qa or kb < qb:
                        raise AssertionError(f"key run {ks} cuts query run {qs}: plan pieces do not line up")
                    first = ks.start + qa - ka
                    pairs.append(Pair(rows, qsl, slice(first, first + qb - qa), True))
    return pairs


def merge_partial(out, lse, block_out, block_lse):
    """Fold one block's (out, lse) into the accumulators, in place. out (B, S, H, D) and
    lse (B, H, S) are fp32/fp64 (views allowed); block_out any dtype, block_lse (B, H, S).
    A block row with lse_b = -inf leaves the accumulators as they are."""
    block_lse = block_lse.to(lse.dtype)
    weight = torch.sigmoid(block_lse - lse).transpose(1, 2).unsqueeze(-1)  # (B, S, H, 1)
    out.sub_(weight * (out - block_out.to(out.dtype)))
    lse.sub_(F.logsigmoid(lse - block_lse))


def run_forward(backend, q, k, v, pairs, scale, acc=None):
    """Attention of q (B, Sq, H, D) over k/v (B, Sk, G, D) restricted to ``pairs``.

    With ``acc`` = (out, lse) from earlier blocks (every row already finite), each pair merges
    into it in place. Without, fresh accumulators are returned: out (B, Sq, H, D) and
    lse (B, H, Sq) in the accumulator dtype, rows no pair covers left at out 0, lse -inf."""
    fresh = acc is None
    if fresh:
        dt = accumulator_dtype(q.dtype)
        out = torch.zeros(q.shape, dtype=dt, device=q.device)
        lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), dtype=dt, device=q.device)
    else:
        out, lse = acc
    seen = set()
    for p in pairs:
        bo, bl = backend.forward(q[p.rows, p.q], k[p.rows, p.k], v[p.rows, p.k], p.causal, scale)
        key = (p.rows.start, p.q.start, p.q.stop)
        if fresh and key not in seen:
            seen.add(key)
            out[p.rows, p.q], lse[p.rows, :, p.q] = bo, bl
        else:
            merge_partial(out[p.rows, p.q], lse[p.rows, :, p.q], bo, bl)
    return out, lse


def run_backward(backend, dout, q, k, v, out, lse, pairs, scale, dq, dk, dv):
    """Adds each pair's gradient to dq (like q) and dk, dv (like k), accumulator dtype, in place.
    ``out`` and ``lse`` are the final merged values of every query row."""
    for p in pairs:
        gq, gk, gv = backend.backward(
            dout[p.rows, p.q],
            q[p.rows, p.q],
            k[p.rows, p.k],
            v[p.rows, p.k],
            out[p.rows, p.q],
            lse[p.rows, :, p.q].contiguous(),
            p.causal,
            scale,
        )
        dq[p.rows, p.q] += gq
        dk[p.rows, p.k] += gk
        dv[p.rows, p.k] += gv


def check_document_ids(document_ids, q) -> None:
    """One integer id per token of q (B, S, ...)."""
    if document_ids.shape != q.shape[:2]:
        raise ValueError(
            f"document_ids has shape {tuple(document_ids.shape)} but q has (batch, seq) = {tuple(q.shape[:2])}; "
            "pass one id per token, split like the tokens"
        )
    if document_ids.dtype.is_floating_point or document_ids.dtype.is_complex or document_ids.dtype == torch.bool:
        raise ValueError(f"document_ids must be an integer tensor (got {document_ids.dtype})")


def check_non_decreasing(ids) -> None:
    """ids (B, S) in natural (global) order."""
    if bool((ids[:, 1:] < ids[:, :-1]).any()):
        raise ValueError(
            "document_ids decrease along the global sequence; number the documents of each sample in order "
            "(non-decreasing ids) and split the ids with zigzag_split like the tokens"
        )


class _PlannedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pairs, scale, backend):
        out, lse = run_forward(backend, q, k, v, pairs, scale)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (pairs, scale, backend)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        pairs, scale, backend = ctx.args
        dq, dk, dv = (torch.zeros_like(t, dtype=lse.dtype) for t in (q, k, v))
        run_backward(backend, dout.contiguous(), q, k, v, out, lse, pairs, scale, dq, dk, dv)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def planned_attention(q, k, v, pairs, scale, backend):
    """Differentiable attention restricted to ``pairs`` (rows no pair covers come out 0)."""
    return _PlannedAttention.apply(q, k, v, pairs, scale, backend)


def whole_sequence_pairs(document_ids, q, causal: bool) -> list[Pair]:
    """Checked plan for a rank that holds the whole sequence in natural order."""
    check_document_ids(document_ids, q)
    check_non_decreasing(document_ids)
    spans = document_spans(document_ids, [(0, q.shape[1], 0)])
    return plan_pairs(spans, spans, causal)


def document_causal_attention(q, k, v, document_ids, *, dropout_p: float, use_flash_attn: bool):
    """``causal_attention`` with documents: q (B, S, H, D), k/v (B, S, G, D), ids (B, S).
    flash-attn: one varlen call over the B*S tokens cut at every document and row edge; torch:
    one fused causal SDPA call per document (dropout handled by the kernels either way)."""
    b, s, h, d = q.shape
    check_document_ids(document_ids, q)
    check_non_decreasing(document_ids)
    if use_flash_attn:
        from flash_attn import flash_attn_varlen_func

        new = torch.ones(b, s, dtype=torch.bool, device=document_ids.device)
        new[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
        edges = torch.cat([new.flatten().nonzero().flatten(), torch.tensor([b * s], device=new.device)])
        cu = edges.to(device=q.device, dtype=torch.int32)
        longest = int((edges[1:] - edges[:-1]).max())
        out = flash_attn_varlen_func(
            *(t.reshape(b * s, t.shape[2], d) for t in (q, k, v)),
            cu,
            cu,
            longest,
            longest,
            dropout_p=dropout_p,
            causal=True,
        )
        return out.view(b, s, h, d)
    rows = []
    for row, spans in enumerate(document_spans(document_ids, [(0, s, 0)])):
        parts = []
        for sp in spans:
            qs, ks, vs = _bhsd(*(t[row : row + 1, sp.start : sp.stop] for t in (q, k, v)))
            o = F.scaled_dot_product_attention(
                qs, ks, vs, dropout_p=dropout_p, is_causal=True, enable_gqa=h != k.shape[2]
            )
            parts.append(o.transpose(1, 2))
        rows.append(torch.cat(parts, dim=1))
    return torch.cat(rows, dim=0)
