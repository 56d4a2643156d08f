"""What the context-parallel attentions share (ring_attention.py, all_gather_attention.py,
ulysses_attention.py): the call checks, and the bookkeeping of computing attention block by
block. A query row's partial results from different key blocks merge through their
log-sum-exp, in the accumulator dtype of megalite.ops.attention (fp32, fp64 for fp64 inputs):
  lse' = logaddexp(lse, lse_b),  out' = out - sigmoid(lse_b - lse) * (out - out_b).
The backward recomputes each block from the inputs and the merged (out, lse) saved here.

Layout: out (B, S, H, D), lse (B, H, S).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..ops.attention import get_backend


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


def merge_partial(out, lse, block_out, block_lse):
    """Fold one block's (out, lse) into the accumulators, in place. out (B, S, H, D) and
    lse (B, H, S) are fp32/fp64 (views allowed); block_out any dtype, block_lse (B, H, S)."""
    block_lse = block_lse.to(lse.dtype)
    weight = torch.sigmoid(block_lse - lse).transpose(1, 2).unsqueeze(-1)  # (B, S, H, 1)
    out.sub_(weight * (out - block_out.to(out.dtype)))
    lse.sub_(F.logsigmoid(lse - block_lse))


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
