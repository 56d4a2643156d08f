import sys
import types

import pytest
import torch
import torch.nn.functional as F

from megalite.config import ModelConfig
from megalite.model import GPT


def tiny(**kw):
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32)
    base.update(kw)
    return ModelConfig(**base)


def batch(b=2, s=32, vocab=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (b, s + 1), generator=g)
    return tokens[:, :-1], torch.arange(s).expand(b, s), tokens[:, 1:]


VARIANTS = [
    dict(),
    dict(swiglu=True, normalization="RMSNorm", group_query_attention=True, num_query_groups=2),
    dict(position_embedding_type="learned_absolute", untie_embeddings_and_output_weights=True),
    dict(add_bias_linear=False, kv_channels=8),
]


@pytest.mark.parametrize("kw", VARIANTS)
def test_shapes_and_causality(kw):
    model = GPT(tiny(**kw), 200)
    tokens, pos, labels = batch()
    assert model(tokens, pos, labels).shape == (2, 32)
    logits = model(tokens, pos)
    assert logits.shape == (2, 32, model.padded_vocab_size) and model.padded_vocab_size == 256
    assert torch.isinf(logits[..., 200:]).all(), "padded vocabulary must never be predicted"
    changed = tokens.clone()
    changed[:, 20:] = (changed[:, 20:] + 1) % 200
    after = model(changed, pos)
    torch.testing.assert_close(after[:, :20], logits[:, :20], rtol=0, atol=0)
    assert not torch.allclose(after[:, 20:, :200], logits[:, 20:, :200])


def test_same_seed_same_weights_and_tied_embeddings():
    a, b, c = GPT(tiny(), 200, seed=3), GPT(tiny(), 200, seed=3), GPT(tiny(), 200, seed=4)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    assert not torch.equal(a.layers[0].mlp.fc1.weight, c.layers[0].mlp.fc1.weight)
    assert a.output_layer.weight is a.embedding.word.weight
    assert a.embedding.word.weight[200:].abs().sum() == 0
    # hidden 256 == padded vocab 256: only vocabulary tensors may have zero (padding) rows
    d = GPT(tiny(hidden_size=256, position_embedding_type="learned_absolute", seq_length=256), 200)
    for name, p in d.named_parameters():
        if p.dim() == 2 and name != "embedding.word.weight":
            assert (p.abs().sum(1) > 0).all(), name


def test_vocab_repadding_keeps_weights_and_outputs():
    a = GPT(tiny(make_vocab_size_divisible_by=8), 200, seed=5)
    tokens, pos, labels = batch()
    before = a(tokens, pos, labels)
    a.pad_vocab_to(4)  # 200 -> multiple of 32 = 224
    assert a.padded_vocab_size == 224 and a.output_layer.weight is a.embedding.word.weight
    torch.testing.assert_close(a(tokens, pos, labels), before)


@pytest.mark.parametrize("granularity", ["full", "selective"])
def test_recompute_gives_identical_loss_and_grads(granularity):
    tokens, pos, labels = batch()
    ref = GPT(tiny(swiglu=True), 200, seed=1)
    rc = GPT(tiny(swiglu=True, recompute_granularity=granularity), 200, seed=1)
    for m in (ref, rc):
        m(tokens, pos, labels).mean().backward()
    for (n, p), q in zip(ref.named_parameters(), rc.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=n)


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = GPT(tiny(), 200, seed=2)
    tokens, pos, labels = batch(b=4, s=16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        loss = model(tokens, pos, labels).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 5.0 and loss.item() < 0.1, (first, loss.item())


def test_use_flash_attn_routes_core_attention_to_flash_attn(monkeypatch):
    calls = []

    def flash_attn_func(q, k, v, dropout_p=0.0, causal=False):  # stand-in with flash-attn's signature
        calls.append((q.shape, k.shape, dropout_p, causal))
        rep = q.shape[2] // k.shape[2]
        q, k, v = (
            q.transpose(1, 2),
            k.repeat_interleave(rep, 2).transpose(1, 2),
            v.repeat_interleave(rep, 2).transpose(1, 2),
        )
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2)

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=flash_attn_func))
    kw = dict(group_query_attention=True, num_query_groups=2)
    tokens, pos, labels = batch()
    ref = GPT(tiny(**kw), 200, seed=6)(tokens, pos, labels)
    flash = GPT(tiny(use_flash_attn=True, **kw), 200, seed=6)(tokens, pos, labels)
    torch.testing.assert_close(flash, ref)
    assert calls and all(c[1][2] == 2 and c[3] for c in calls), "GQA K/V must reach flash-attn unexpanded"
