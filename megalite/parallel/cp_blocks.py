"""What the context-parallel attentions share (ring_attention.py, all_gather_attention.py,
ulysses_attention.py): the call checks, the sample's document ids, and the bookkeeping of
computing attention block by block. Blocks run as plans of kernel calls
(megalite.ops.doc_attention) whose partial results merge through their log-sum-exp in fp32.
The backward recomputes each block from the inputs and the merged (out, lse) saved here.

Layout: out (B, S, H, D), lse (B, H, S).
"""

from __future__ import annotations

import torch.distributed as dist

from ..ops.attention import get_backend
from ..ops.doc_attention import check_document_ids, check_non_decreasing
from .comm import all_gather_flat
from .zigzag import zigzag_merge


def resolve_call(q, k, v, group, causal, softmax_scale, backend):
    """Shape checks shared by the context-parallel attentions; returns (scale, backend object)."""
    if q.dim() != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(
            f"context-parallel attention expects q (B, S, H, D) and k, v (B, S, G, D); got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} are not a multiple of kv heads {k.shape[2]}")
    if causal and dist.get_world_size(group) > 1 and q.shape[1] % 2:
        raise ValueError(f"local sequence length {q.shape[1]} is odd; a zigzag pair has two equal chunks")
    if isinstance(backend, str):
        backend = get_backend(backend, q.device, q.dtype, q.shape[-1])
    return (softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5), backend


def gather_document_ids(document_ids, q, group):
    """The sample's document ids (B, S) in natural order, from every rank's zigzag pair (B, s).
    Shape problems raise before the all-gather; decreasing ids after it, on every rank alike
    (all hold the same gathered ids, so no rank is left waiting in a collective).
    forward only: one all-gather of B*s integers."""
    cp = dist.get_world_size(group)
    check_document_ids(document_ids, q)
    if cp > 1 and q.shape[1] % 2:
        raise ValueError(f"local sequence length {q.shape[1]} is odd; document_ids need the zigzag split")
    ids = document_ids.contiguous()
    if cp > 1:
        flat = ids.new_empty(cp * ids.numel())
        all_gather_flat(flat, ids.view(-1), group=group)
        ids = zigzag_merge(list(flat.view(cp, *ids.shape).unbind(0)), dim=1)
    ids = ids.cpu()
    check_non_decreasing(ids)
    return ids


def save_block_state(ctx, q, k, v, out, lse, args):
    """Forward bookkeeping: keep the inputs, the merged output (in q's dtype, returned) and its
    fp32 lse for the backward, which recomputes block by block."""
    out = out.to(q.dtype)
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.args = args
    return out


def load_block_state(ctx):
    """(q, k, v, out, lse, *args) as saved by ``save_block_state``."""
    return (*ctx.saved_tensors, *ctx.args)
