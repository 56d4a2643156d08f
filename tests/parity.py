"""Inputs and references shared by the parity tests (attention, and the whole model under TP/CP).

Test modules import these from here, never from each other, so running one test file never
collects another's tests and a helper has one home.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megalite.config import ModelConfig
from megalite.parallel.zigzag import zigzag_split

# ---- attention: full-sequence inputs and a float64 reference ----

TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.bfloat16: dict(atol=4e-2, rtol=4e-2),
}


def reference(q, k, v, dout, causal):
    """Full attention in float64 (GQA by SDPA's own head grouping): out, dq, dk, dv."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(
        *(t.transpose(1, 2) for t in (q, k, v)), is_causal=causal, enable_gqa=True
    ).transpose(1, 2)
    out.backward(dout.double())
    return out.detach(), q.grad, k.grad, v.grad


def make_inputs(seed, batch, seq, heads, kv_heads, head_dim, dtype):
    gen = torch.Generator().manual_seed(seed)
    shapes = [
        (batch, seq, heads, head_dim),
        (batch, seq, kv_heads, head_dim),
        (batch, seq, kv_heads, head_dim),
        (batch, seq, heads, head_dim),
    ]
    return [torch.randn(s, generator=gen).to(dtype) for s in shapes]


# ---- the whole model: tiny configs, micro-batches, gathering TP shards ----

VOCAB = 37  # prime: padded to 40 dense, 48 at TP=2, 64 at TP=4 (with divisible-by 8)
SEQ, BATCH = 8, 2
VARIANTS = [
    dict(
        swiglu=True,
        normalization="RMSNorm",
        group_query_attention=True,
        num_query_groups=4,
        num_attention_heads=8,
        hidden_size=32,
        ffn_hidden_size=24,
        recompute_granularity="selective",
    ),
    dict(
        position_embedding_type="learned_absolute",
        untie_embeddings_and_output_weights=True,
        num_attention_heads=4,
        hidden_size=20,
        ffn_hidden_size=28,
        recompute_granularity="full",
    ),
]


def model_cfg(**kw):
    return ModelConfig(**{"num_layers": 2, "seq_length": SEQ, "make_vocab_size_divisible_by": 8, **kw})


def make_batches(n):
    """n micro-batches of (tokens, position_ids, labels, loss_mask), with ignored labels and a ragged mask."""
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
        labels = tokens[:, 1:].clone()
        labels[0, :3] = -100  # ignored positions
        mask = (torch.rand(BATCH, SEQ, generator=g) > 0.2).double()
        out.append((tokens[:, :-1], torch.arange(SEQ).expand(BATCH, SEQ), labels, mask))
    return out


def gather_shards(local, dense_shape, group):
    """Concatenate the TP shards of `local` along the one dim where it is smaller than dense."""
    diff = [d for d in range(local.dim()) if local.shape[d] != dense_shape[d]]
    if not diff:
        return local
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts, dim=diff[0])


def masked_loss(model, batches, cp=1, cp_rank=0):
    """Backward of sum(loss * mask) / tokens over micro-batches through the model's masked-loss
    path (the token-tiled output layer + loss unless loss_chunk_size is 0), each rank seeing its
    zigzag shard; returns this rank's share of the loss."""
    model.train()
    total = sum(m.sum() for *_, m in batches)
    loss = 0.0
    for batch in batches:
        tokens, pos, labels, mask = (zigzag_split(t, 1, cp, cp_rank) for t in batch)
        part = model(tokens, pos, labels, loss_mask=mask) / total
        part.backward()
        loss += part.detach()
    return loss


def assert_rel(got, want, rel=1e-6, msg=""):
    """Every element within ``rel`` of the tensor's largest magnitude."""
    scale = want.abs().max().item()
    err = (got - want).abs().max().item()
    assert err <= rel * scale, f"{msg}: max error {err:.3g} > {rel} x {scale:.3g}"
