"""The whole GPT under tensor (+ sequence) parallel equals one rank: loss and every gradient.

One spawn of 4 gloo ranks checks TP=4 and TP=2 (two independent pairs), each with and
without sequence parallel, on model variants covering GQA + SwiGLU + RMSNorm + biases (tied
embeddings, RoPE) and MHA + GELU + LayerNorm + learned positions (untied), with full and
selective recompute. Two micro-batches are accumulated, so the sequence-parallel gradient
hooks must keep sum semantics. The same spawn checks the token-tiled vocabulary-parallel loss
and the sequence-tiled MLP against the dense plain path.
"""

import warnings

import pytest
import torch
import torch.distributed as dist
from multiproc import run_ranks
from parity import BATCH, SEQ, VARIANTS, VOCAB, assert_rel, gather_shards, make_batches, masked_loss, model_cfg
from torch.testing import assert_close

from megalite.config import ConfigError
from megalite.model import GPT
from megalite.parallel.apply_tp import apply_tp, validate_tp
from megalite.parallel.comm import CommCounter
from megalite.parallel.tensor_parallel import split_dim


def _train_grads(model, batches):
    """Accumulate grads of sum(loss * mask) / tokens over micro-batches; return the losses."""
    model.train()
    total = sum(m.sum() for *_, m in batches)
    losses = []
    for tokens, pos, labels, mask in batches:
        loss = model(tokens, pos, labels)
        (loss * mask).sum().div(total).backward()
        losses.append(loss.detach())
    return losses


def _check_one(kw, group, sp):
    tp = dist.get_world_size(group)
    cfg = model_cfg(**kw)
    batches = make_batches(2)
    dense = GPT(cfg, VOCAB, seed=11)
    want = _train_grads(dense, batches)

    model = apply_tp(GPT(cfg, VOCAB, seed=11), group, sp)
    tag = f"tp={tp} sp={sp} {kw}"
    seen, heads = [], []  # the norm must run on the rank's sequence shard under SP
    hooks = [
        model.layers[0].input_norm.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0])),
        model.layers[0].attention.core_attention.register_forward_hook(
            lambda m, args, out: heads.append((args[0].shape[2], args[1].shape[2]))
        ),
    ]
    got = _train_grads(model, batches)
    for hook in hooks:
        hook.remove()
    assert set(seen) == {SEQ // tp if sp else SEQ}
    # Each rank attends over its share of the query heads and KV heads.
    assert set(heads) == {(cfg.num_attention_heads // tp, cfg.num_kv_heads // tp)}, tag
    for g, w in zip(got, want):
        assert_close(g, w, msg=tag)

    dense_params = dict(dense.named_parameters())
    assert set(dict(model.named_parameters())) == set(dense_params), tag
    norm_sq_sharded, norm_sq_replicated = 0.0, 0.0
    for name, p in model.named_parameters():
        ref = dense_params[name]
        full = gather_shards(p.grad, ref.shape, group)
        rows = ref.shape[0]  # vocab-padded tensors: TP pads further; extra rows must stay zero
        assert_close(full[:rows], ref.grad, msg=f"{tag} {name}")
        assert not full[rows:].any(), f"{tag} {name}"
        if split_dim(p) is not None:
            norm_sq_sharded += p.grad.pow(2).sum()
        else:
            norm_sq_replicated += p.grad.pow(2).sum()
    # What grad clipping computes: shards summed over TP, replicated params counted once.
    sharded = torch.tensor([float(norm_sq_sharded)], dtype=torch.float64)
    dist.all_reduce(sharded, group=group)
    dense_norm_sq = sum(p.grad.pow(2).sum() for p in dense.parameters())
    assert_close(sharded[0] + norm_sq_replicated, dense_norm_sq, msg=tag)

    if cfg.untie_embeddings_and_output_weights:
        assert model.output_layer.weight is not model.embedding.word.weight
    else:
        assert model.output_layer.weight is model.embedding.word.weight

    # One input and one output collective per MLP, also when SwiGLU's gate and fc1 share the input.
    x = torch.randn(SEQ // tp if sp else SEQ, BATCH, cfg.hidden_size, requires_grad=True)
    with CommCounter() as counter:
        model.layers[0].mlp(x).sum().backward()
    expected = (
        [
            ("all_gather", "forward"),
            ("reduce_scatter", "forward"),
            ("all_gather", "backward"),
            ("reduce_scatter", "backward"),
        ]
        if sp
        else [("all_reduce", "forward"), ("all_reduce", "backward")]
    )
    assert [(r.op, r.phase) for r in counter.records if r.phase != "grad"] == expected, tag

    model.eval()
    dense.eval()
    tokens, pos, *_ = batches[0]
    logits = gather_shards(model(tokens, pos), (BATCH, SEQ, VOCAB), group)  # vocab shards [b, s, V/tp]
    assert_close(logits[..., :VOCAB], dense(tokens, pos)[..., :VOCAB], msg=tag)
    assert torch.isinf(logits[..., VOCAB:]).all(), "padded vocabulary must never be predicted"


def _check_tiled(kw, group, sp):
    """The token-tiled vocabulary-parallel loss (chunks of 5 tokens; at TP=4 one rank's vocabulary
    shard is all padding) and the sequence-tiled MLP (tiles of 3) equal the dense plain path."""
    batches = make_batches(2)
    dense = GPT(model_cfg(**kw, loss_chunk_size=0), VOCAB, seed=11)
    want = masked_loss(dense, batches)
    model = apply_tp(GPT(model_cfg(**kw, loss_chunk_size=5, mlp_tile_size=3), VOCAB, seed=11), group, sp)
    tag = f"tiled tp={dist.get_world_size(group)} sp={sp} {kw}"
    assert_rel(masked_loss(model, batches), want, msg=tag)
    dense_params = dict(dense.named_parameters())
    for name, p in model.named_parameters():
        ref = dense_params[name]
        full = gather_shards(p.grad, ref.shape, group)
        assert_rel(full[: ref.shape[0]], ref.grad, msg=f"{tag} {name}")


def _model_checks(rank, world):
    torch.set_default_dtype(torch.float64)  # exact parity; this spawned process only
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank joins both calls
    groups = [dist.group.WORLD, pairs[rank // 2]]
    for group in groups:
        for sp in (False, True):
            for kw in VARIANTS:
                _check_one(kw, group, sp)
                _check_tiled(kw, group, sp)


def test_tp_model_matches_single_rank(tmp_path):
    run_ranks(_model_checks, 4, tmp_path)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(num_attention_heads=6, hidden_size=24), "--num-attention-heads 6 is not divisible"),
        (
            dict(num_attention_heads=8, hidden_size=32, group_query_attention=True, num_query_groups=2),
            "--num-query-groups 2 is not divisible",
        ),
        (dict(ffn_hidden_size=30), "--ffn-hidden-size 30 is not divisible"),
    ],
)
def test_validate_tp_rejects_indivisible_model(kw, match):
    with pytest.raises(ConfigError, match=match):
        validate_tp(model_cfg(**kw), 4, False)


def test_validate_tp_sequence_parallel():
    with pytest.raises(ConfigError, match="make --seq-length a multiple of 8"):
        validate_tp(model_cfg(seq_length=12), 4, True, cp=2)
    validate_tp(model_cfg(seq_length=12), 4, False, cp=2)
    with pytest.warns(UserWarning, match="no effect with --tensor-parallel-size 1"):
        validate_tp(model_cfg(num_attention_heads=3, hidden_size=9), 1, True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate_tp(model_cfg(), 1, False)
