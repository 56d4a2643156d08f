"""Output projection + cross entropy, tiled over tokens: the full logits never exist.

For N tokens and a vocabulary (shard) of V columns the plain path holds [N, V] fp32 logits, their
softmax and their gradient at once (8 GiB each for 16k tokens of Llama-3's 128,256 columns). Here
the tokens are taken ``chunk_size`` at a time: each chunk's logits are computed, turned into its
losses and, in the same pass, into its share of the gradients w.r.t. the hidden states and the
weight; then they are dropped. At most one chunk of logits is alive.

The gradient is computed in the forward pass (no second logits matmul in backward), which needs
the weight each token's loss gets: the function returns the weighted sum ``sum_n w_n loss_n``
(w = the loss mask), whose gradient is those partial gradients times one scalar. That is exactly
what the training loop reduces to (masked sum / global token count).

One implementation serves one device and the vocabulary-parallel TP loss: the caller passes the
two reductions over the vocabulary (``reduce_max``, ``reduce_sum``; identity on one device; an
all-reduce over the TP group in megalite.parallel.vocab_parallel_loss).

Numerics: matmuls in the compute dtype (autocast's, else the weight's), softmax and loss in fp32
(fp64 when the inputs are fp64), the weight gradient accumulated in fp32 over chunks.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def _identity(t):
    return t


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    device = weight.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


def chunked_loss_and_grads(
    hidden, weight, labels, token_weight, chunk_size, *, vocab_start, vocab_size, reduce_max, reduce_sum, need_grad
):
    """hidden [N, h], weight [V_local, h] (global columns from ``vocab_start``; columns at or past
    ``vocab_size`` are padding and never predicted), labels [N] (IGNORE_INDEX: no loss),
    token_weight [N]. Returns (per-token loss [N] fp32, d(sum w*loss)/d hidden [N, h] or None,
    d(sum w*loss)/d weight [V_local, h] fp32 or None)."""
    cdt = _compute_dtype(weight)
    acc = torch.promote_types(cdt, torch.float32)
    w_c = weight.to(cdt)
    n, v_local = hidden.shape[0], weight.shape[0]
    pad_from = vocab_size - vocab_start  # first local padding column (may be <= 0 or >= v_local)
    losses = torch.empty(n, dtype=acc, device=hidden.device)
    grad_h = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_grad else None
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_grad else None
    # Vocabulary rows per weight-gradient product, so its temporary is about one chunk of logits.
    rows = max(1, chunk_size * v_local // max(1, weight.shape[1]))
    for a in range(0, n, chunk_size):
        h = hidden[a : a + chunk_size].to(cdt)  # [c, h]
        logits = (h @ w_c.t()).to(acc)  # [c, V_local]; the only [tokens, vocab] tensor alive
        if pad_from < v_local:
            logits[:, max(pad_from, 0) :] = float("-inf")
        logits -= reduce_max(logits.max(dim=-1).values).unsqueeze(-1)
        target = labels[a : a + chunk_size] - vocab_start
        ignored = labels[a : a + chunk_size] == IGNORE_INDEX
        mine = (target >= 0) & (target < v_local) & ~ignored  # the target column is on this rank
        target = target.masked_fill(~mine, 0)
        picked = logits.gather(-1, target.unsqueeze(-1)).squeeze(-1).masked_fill(~mine, 0.0)
        probs = logits.exp_()
        picked, sum_exp = reduce_sum(torch.stack([picked, probs.sum(dim=-1)])).unbind(0)
        losses[a : a + chunk_size] = (sum_exp.log() - picked).masked_fill(ignored, 0.0)
        if not need_grad:
            continue
        # d loss_n / d logits = softmax - onehot(target), scaled by the token's weight; in place,
        # so the chunk's fp32 logits buffer is the only one.
        scale = token_weight[a : a + chunk_size].to(acc).masked_fill(ignored, 0.0)
        probs *= (scale / sum_exp).unsqueeze(-1)
        probs.scatter_add_(-1, target.unsqueeze(-1), -(mine.to(acc) * scale).unsqueeze(-1))
        d = probs.to(cdt)  # [c, V_local]
        del probs, logits
        grad_h[a : a + chunk_size] = d @ w_c
        for r in range(0, v_local, rows):
            grad_w[r : r + rows].add_(d[:, r : r + rows].t() @ h)  # fp32 += compute-dtype product
    return losses, grad_h, grad_w


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """forward: sum_n w_n loss_n, computing both gradients on the way / backward: scale them."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, token_weight, options):
        losses, grad_h, grad_w = chunked_loss_and_grads(hidden, weight, labels, token_weight, need_grad=True, **options)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return (losses * token_weight.to(losses.dtype)).sum()

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        g_h = grad_h * grad_out.to(grad_h.dtype) if ctx.needs_input_grad[0] else None
        g_w = (grad_w * grad_out.to(grad_w.dtype)).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return g_h, g_w, None, None, None


def fused_linear_cross_entropy(
    hidden,
    weight,
    labels,
    token_weight,
    chunk_size: int,
    *,
    vocab_start: int = 0,
    vocab_size: int | None = None,
    reduce_max=_identity,
    reduce_sum=_identity,
):
    """``sum_n token_weight_n * cross_entropy(hidden_n @ weight.T, labels_n)`` as a 0-dim fp32
    tensor, tokens ``chunk_size`` at a time. hidden [..., h] and labels/token_weight [...] (same
    leading shape), weight [V_local, h]; label IGNORE_INDEX adds nothing. Without autograd (eval)
    only the losses are computed."""
    h = hidden.reshape(-1, hidden.shape[-1])
    labels, token_weight = labels.reshape(-1), token_weight.reshape(-1)
    options = dict(
        chunk_size=chunk_size,
        vocab_start=vocab_start,
        vocab_size=vocab_start + weight.shape[0] if vocab_size is None else vocab_size,
        reduce_max=reduce_max,
        reduce_sum=reduce_sum,
    )
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _FusedLinearCrossEntropy.apply(h, weight, labels, token_weight, options)
    losses, _, _ = chunked_loss_and_grads(h, weight, labels, token_weight, need_grad=False, **options)
    return (losses * token_weight.to(losses.dtype)).sum()
