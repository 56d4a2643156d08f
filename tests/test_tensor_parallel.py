"""Tensor-parallel layers against dense nn.Linear / nn.Embedding / F.cross_entropy.

Every rank builds the dense module and data from one seed, runs the dense reference with
autograd, then the TP layer built with from_dense, and compares its output and every gradient
(input and parameters) with the matching slice of the reference. The scalar being
differentiated is <output, G>, with G the upstream gradient sliced like the output.
"""

import itertools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from multiproc import run_ranks
from torch import nn
from torch.testing import assert_close

from megalite.parallel.comm import CommCounter
from megalite.parallel.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    split_dim,
    vocab_parallel_cross_entropy,
)

B, H_IN, H_OUT, V = 2, 5, 7, 12  # odd sizes; the sharded dims are multiples of 2 and 4 (12, 4p)


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _dense_linear(i, o, seed):
    torch.manual_seed(seed)
    return nn.Linear(i, o, dtype=torch.float64)


def _piece(t, p, r, dim):
    return t.chunk(p, dim=dim)[r]


def _reference(module, x, g):
    x = x.clone().requires_grad_()
    y = module(x)
    (y * g).sum().backward()
    return y.detach(), x.grad


def _check_column(rank, p, group):
    s = 3 * p
    for gather_output, sp in itertools.product([False, True], [False, True]):
        dense = _dense_linear(H_IN, V, seed=1)
        x_full, g_full = _randn(s, B, H_IN, seed=2), _randn(s, B, V, seed=3)
        y_ref, dx_ref = _reference(dense, x_full, g_full)
        layer = ColumnParallelLinear.from_dense(dense, group, gather_output=gather_output, sequence_parallel=sp)
        x = (_piece(x_full, p, rank, 0) if sp else x_full).clone().requires_grad_()
        y = layer(x)
        g = g_full if gather_output else _piece(g_full, p, rank, -1)
        (y * g).sum().backward()
        tag = f"column gather_output={gather_output} sp={sp}"
        assert_close(y, y_ref if gather_output else _piece(y_ref, p, rank, -1), msg=tag)
        assert_close(x.grad, _piece(dx_ref, p, rank, 0) if sp else dx_ref, msg=tag)
        assert_close(layer.weight.grad, _piece(dense.weight.grad, p, rank, 0), msg=tag)
        assert_close(layer.bias.grad, _piece(dense.bias.grad, p, rank, 0), msg=tag)
        assert split_dim(layer.weight) == 0 and split_dim(layer.bias) == 0


def _check_row(rank, p, group):
    s = 3 * p
    for input_is_parallel, sp in [(True, False), (True, True), (False, False)]:
        dense = _dense_linear(V, H_OUT, seed=4)
        x_full, g_full = _randn(s, B, V, seed=5), _randn(s, B, H_OUT, seed=6)
        y_ref, dx_ref = _reference(dense, x_full, g_full)
        layer = RowParallelLinear.from_dense(dense, group, input_is_parallel=input_is_parallel, sequence_parallel=sp)
        x = (_piece(x_full, p, rank, -1) if input_is_parallel else x_full).clone().requires_grad_()
        y = layer(x)
        (y * (_piece(g_full, p, rank, 0) if sp else g_full)).sum().backward()
        tag = f"row input_is_parallel={input_is_parallel} sp={sp}"
        assert_close(y, _piece(y_ref, p, rank, 0) if sp else y_ref, msg=tag)
        assert_close(x.grad, _piece(dx_ref, p, rank, -1) if input_is_parallel else dx_ref, msg=tag)
        assert_close(layer.weight.grad, _piece(dense.weight.grad, p, rank, 1), msg=tag)
        assert_close(layer.bias.grad, dense.bias.grad, msg=tag)  # under SP: summed by the hook
        assert split_dim(layer.weight) == 1
        assert split_dim(layer.bias) is None
        assert getattr(layer.bias, "sequence_parallel", False) == sp


def _check_embedding(rank, p, group):
    s = 3 * p
    ids = torch.randint(0, V, (s, B), generator=torch.Generator().manual_seed(7))
    ids[0] = torch.tensor([0, V - 1])  # both ends of the vocabulary
    for sp in (False, True):
        torch.manual_seed(8)
        dense = nn.Embedding(V, H_OUT, dtype=torch.float64)
        g_full = _randn(s, B, H_OUT, seed=9)
        y_ref = dense(ids)
        (y_ref * g_full).sum().backward()
        layer = VocabParallelEmbedding.from_dense(dense, group, sequence_parallel=sp)
        assert (layer.vocab_start, layer.vocab_end) == (rank * V // p, (rank + 1) * V // p)
        y = layer(ids)
        (y * (_piece(g_full, p, rank, 0) if sp else g_full)).sum().backward()
        assert_close(y, _piece(y_ref, p, rank, 0) if sp else y_ref.detach(), msg=f"embedding sp={sp}")
        assert_close(layer.weight.grad, _piece(dense.weight.grad, p, rank, 0), msg=f"embedding sp={sp}")
        assert split_dim(layer.weight) == 0


def _check_cross_entropy(rank, p, group):
    s = 5
    logits_full = _randn(s, B, V, seed=10)
    logits_full[..., V - 2 :] = float("-inf")  # padded vocabulary, as the model masks it
    target = torch.randint(0, V - 2, (s, B), generator=torch.Generator().manual_seed(11))
    target[1, 0] = target[3, 1] = -100
    target[0, 0], target[0, 1] = 0, V - 3  # first and last real ids live on different ranks
    weight = _randn(s, B, seed=12).abs() * (_randn(s, B, seed=13) > -0.5)  # loss mask x scale

    ref_in = logits_full.clone().requires_grad_()
    ref = F.cross_entropy(ref_in.view(-1, V), target.view(-1), reduction="none", ignore_index=-100).view(s, B)
    (ref * weight).sum().backward()

    shard = _piece(logits_full, p, rank, -1).clone().requires_grad_()
    with CommCounter() as counter:
        loss = vocab_parallel_cross_entropy(shard, target, group)
        (loss * weight).sum().backward()
    assert loss.dtype == torch.float32 and shard.grad.dtype == torch.float64  # loss in fp32, like the model's
    assert_close(loss, ref.detach().float())
    assert_close(shard.grad, _piece(ref_in.grad, p, rank, -1), rtol=1e-5, atol=1e-6)
    assert (loss[target == -100] == 0).all()
    # Never gathers logits: only per-token all-reduces (the max, then [2, s, b] sums).
    assert [r.op for r in counter.records] == ["all_reduce"] * 2
    assert max(r.tensor_bytes for r in counter.records) == 2 * s * B * 4  # fp32

    low = vocab_parallel_cross_entropy(shard.detach().bfloat16().requires_grad_(), target, group)
    assert low.dtype == torch.float32
    assert_close(low, ref.detach().float(), rtol=0.05, atol=0.05)
    low.sum().backward()


def _check_construction_and_errors(rank, p, group):
    col = ColumnParallelLinear(H_IN, 4 * p, group=group)
    row = RowParallelLinear(4 * p, H_OUT, group=group, bias=False)
    emb = VocabParallelEmbedding(V, H_OUT, group=group)
    assert col.weight.shape == (4, H_IN) and col.bias.shape == (4,)
    assert row.weight.shape == (H_OUT, 4) and row.bias is None
    assert emb.weight.shape == (V // p, H_OUT)
    assert row(col(torch.randn(3, B, H_IN))).shape == (3, B, H_OUT)
    with pytest.raises(ValueError, match=r"ColumnParallelLinear out_features \(13\) is not divisible"):
        ColumnParallelLinear(H_IN, 13, group=group)
    with pytest.raises(ValueError, match=r"RowParallelLinear in_features \(13\) is not divisible"):
        RowParallelLinear(13, H_OUT, group=group)
    with pytest.raises(ValueError, match="sequence_parallel needs input_is_parallel=True"):
        RowParallelLinear(4 * p, H_OUT, group=group, input_is_parallel=False, sequence_parallel=True)
    with pytest.raises(ValueError, match=r"num_embeddings \(13\) is not divisible"):
        VocabParallelEmbedding(13, H_OUT, group=group)
    sp_row = RowParallelLinear(4 * p, H_OUT, group=group, sequence_parallel=True)
    with pytest.raises(ValueError, match="pad the sequence length"):  # raised before any collective
        sp_row(torch.randn(p + 1, B, 4))


def _all_checks(rank, world):
    group = dist.group.WORLD
    for check in (_check_column, _check_row, _check_embedding, _check_cross_entropy, _check_construction_and_errors):
        check(rank, world, group)


@pytest.mark.parametrize("world", [2, 4])
def test_layers_match_dense(tmp_path, world):
    run_ranks(_all_checks, world, tmp_path)
