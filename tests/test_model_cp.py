"""The whole GPT under context parallel equals one rank: loss and every parameter gradient.

Each rank builds the one-rank model and the CP model from the same seed, feeds the CP model its
zigzag shard of the same micro-batches (tokens, shifted labels, loss mask, position ids),
normalises by the global number of loss tokens, sums gradients over the CP group (what the
loop's DP x CP reduction does) and compares. One spawn of 4 ranks covers CP=4 and CP=2 (two
independent pairs) for every --cp-comm-type on two model variants (GQA + RoPE + SwiGLU +
selective recompute; MHA + learned absolute positions + full recompute), the TP=2 x CP=2 grid
with sequence parallel, and bf16 autocast; and, at CP=4 and CP=2, the token-tiled loss with the
sequence-tiled MLP against the dense plain path.
Hierarchical CP (a2a+p2p) runs at A=2 x P=2 on 4 ranks and, in the slow 8-rank test, at
TP=2 + SP x CP=4 (A=2, P=2).
"""

import copy

import pytest
import torch
import torch.distributed as dist
from multiproc import run_ranks
from parity import VARIANTS, VOCAB, assert_rel, gather_shards, make_batches, masked_loss, model_cfg
from torch.testing import assert_close

from megalite.config import ParallelConfig
from megalite.model import GPT
from megalite.parallel.apply_cp import apply_cp
from megalite.parallel.apply_tp import apply_tp
from megalite.parallel.dims import ParallelDims
from megalite.parallel.zigzag import zigzag_split


def _losses_and_grads(model, batches, cp=1, cp_rank=0, inner=1):
    """Accumulate grads of sum(loss * mask) / global tokens over micro-batches, each rank
    seeing its zigzag shard; returns this rank's masked loss sum (a share of the total)."""
    model.train()
    total = sum(m.sum() for *_, m in batches)
    loss_sum = 0.0
    for batch in batches:
        tokens, pos, labels, mask = (zigzag_split(t, 1, cp, cp_rank, inner) for t in batch)
        loss = (model(tokens, pos, labels) * mask).sum() / total
        loss.backward()
        loss_sum += loss.detach()
    return loss_sum


def _sum_over(group, model, loss):
    loss = loss.clone()
    dist.all_reduce(loss, group=group)
    for p in model.parameters():
        dist.all_reduce(p.grad, group=group)
    return loss


def _check(kw, cp_group, comm, tp_group=None, sp=False, bf16=False, hier=None):
    """``hier``: ParallelDims of a2a+p2p (its group pair and A replace cp_group's attention)."""
    cp, cp_rank = dist.get_world_size(cp_group), dist.get_rank(cp_group)
    inner = hier.cp_a2a if hier else 1
    tag = f"cp={cp} {comm} a2a={inner} tp={tp_group and dist.get_world_size(tp_group)} sp={sp} bf16={bf16} {kw}"
    cfg = model_cfg(**kw)
    batches = make_batches(2)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    dense = GPT(cfg, VOCAB, seed=11)
    if bf16:
        dense.float()  # fp32 master weights under bf16 autocast, as in training
    model = copy.deepcopy(dense)
    with autocast:
        want = _losses_and_grads(dense, batches)
    if tp_group is not None:
        apply_tp(model, tp_group, sp)
    apply_cp(model, (hier.cp_a2a_group, hier.cp_ring_group) if hier else cp_group, comm)
    with autocast:
        got = _sum_over(cp_group, model, _losses_and_grads(model, batches, cp, cp_rank, inner))
    assert_close(got, want, **(dict(atol=0, rtol=1e-2) if bf16 else {}), msg=tag)
    dense_params = dict(dense.named_parameters())
    for name, p in model.named_parameters():
        ref = dense_params[name]
        full = p.grad if tp_group is None else gather_shards(p.grad, ref.shape, tp_group)
        # bf16: both sides round differently; allow 2% of the tensor's largest gradient
        tol = dict(atol=2e-2 * ref.grad.abs().max().item(), rtol=0) if bf16 else {}
        assert_close(full[: ref.shape[0]], ref.grad, **tol, msg=f"{tag} {name}")


def _check_tiled(kw, cp_group):
    """The token-tiled loss and the sequence-tiled MLP on zigzag shards equal the dense plain path."""
    cp, cp_rank = dist.get_world_size(cp_group), dist.get_rank(cp_group)
    batches = make_batches(2)
    dense = GPT(model_cfg(**kw, loss_chunk_size=0), VOCAB, seed=11)
    want = masked_loss(dense, batches)
    model = apply_cp(GPT(model_cfg(**kw, loss_chunk_size=3, mlp_tile_size=3), VOCAB, seed=11), cp_group)
    tag = f"tiled cp={cp} {kw}"
    assert_rel(_sum_over(cp_group, model, masked_loss(model, batches, cp, cp_rank)), want, msg=tag)
    dense_params = dict(dense.named_parameters())
    for name, p in model.named_parameters():
        assert_rel(p.grad, dense_params[name].grad, msg=f"{tag} {name}")


def _model_checks(rank, world):
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank joins both calls
    torch.set_default_dtype(torch.float64)  # exact parity; this spawned process only
    for cp_group in (dist.group.WORLD, pairs[rank // 2]):
        for comm in ("p2p", "all_gather", "a2a"):
            for kw in VARIANTS:
                _check(kw, cp_group, comm)
        for kw in VARIANTS:
            _check_tiled(kw, cp_group)
    dims = ParallelDims.build(ParallelConfig(tensor_parallel_size=2, context_parallel_size=2, sequence_parallel=True))
    for comm in ("p2p", "a2a"):
        for kw in VARIANTS:
            _check(kw, dims.cp_group, comm, dims.tp_group, sp=True)
    hier = _hierarchical_dims(tp=1, cp=4)
    for kw in VARIANTS:
        _check(kw, hier.cp_group, "a2a+p2p", hier=hier)
    torch.set_default_dtype(torch.float32)
    _check(VARIANTS[0], pairs[rank // 2], "p2p", bf16=True)


def _hierarchical_dims(tp, cp):
    cfg = ParallelConfig(
        tensor_parallel_size=tp,
        context_parallel_size=cp,
        sequence_parallel=tp > 1,
        cp_comm_type="a2a+p2p",
        hierarchical_context_parallel_sizes=[2, cp // 2],
    )
    return ParallelDims.build(cfg)


def test_cp_model_matches_single_rank(tmp_path):
    run_ranks(_model_checks, 4, tmp_path)


def _hierarchical_tp_checks(rank, world):
    torch.set_default_dtype(torch.float64)
    dims = _hierarchical_dims(tp=2, cp=4)
    for kw in VARIANTS:
        _check(kw, dims.cp_group, "a2a+p2p", dims.tp_group, sp=True, hier=dims)


@pytest.mark.slow
def test_hierarchical_cp_with_tp_sp_matches_single_rank(tmp_path):
    """TP=2 + SP x CP=4 as A=2 all-to-all x P=2 ring: 8 ranks."""
    run_ranks(_hierarchical_tp_checks, 8, tmp_path)
