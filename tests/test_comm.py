"""Collectives in megalite.parallel.comm against a single-process reference.

Each op maps logical tensors to logical tensors. A replicated input is one tensor that every
rank holds; a per-rank input differs by rank. Likewise the upstream gradient is one tensor
(replicated output, e.g. after an all-reduce) or a per-rank partial (the output feeds a
rank-local consumer). Every rank rebuilds all tensors from one seed, runs a plain-torch
reference and its autograd, and checks its own output and input gradient against it.
"""

import pytest
import torch
import torch.distributed as dist
from multiproc import run_ranks
from torch.testing import assert_close

from megalite.parallel import comm


def _chunks(x, p, dim):
    return list(x.chunk(p, dim=dim))


# name -> (op, reference(rank inputs, p) -> rank outputs, input shape(p), input replicated, grad replicated)
CASES = {
    "copy_to_region": (comm.copy_to_region, lambda xs, p: xs, lambda p: (3, 2, 5), True, False),
    "reduce_from_region": (comm.reduce_from_region, lambda xs, p: [sum(xs)] * p, lambda p: (3, 2, 5), False, True),
    "scatter_last_dim": (
        comm.scatter_last_dim,
        lambda xs, p: _chunks(xs[0], p, -1),
        lambda p: (3, 2, 7 * p),
        True,
        False,
    ),
    "gather_last_dim": (comm.gather_last_dim, lambda xs, p: [torch.cat(xs, -1)] * p, lambda p: (3, 2, 7), False, True),
    "gather_along_sequence": (
        comm.gather_along_sequence,
        lambda xs, p: [torch.cat(xs, 0)] * p,
        lambda p: (3, 2, 5),
        False,
        False,
    ),
    "reduce_scatter_along_sequence": (
        comm.reduce_scatter_along_sequence,
        lambda xs, p: _chunks(sum(xs), p, 0),
        lambda p: (3 * p, 2, 5),
        False,
        False,
    ),
    "scatter_to_sequence": (
        comm.scatter_to_sequence,
        lambda xs, p: _chunks(xs[0], p, 0),
        lambda p: (3 * p, 2, 5),
        True,
        False,
    ),
}

# name -> expected [(op, phase)] records, in order
EXPECTED_RECORDS = {
    "copy_to_region": [("all_reduce", "backward")],
    "reduce_from_region": [("all_reduce", "forward")],
    "scatter_last_dim": [("all_gather", "backward")],
    "gather_last_dim": [("all_gather", "forward")],
    "gather_along_sequence": [("all_gather", "forward"), ("reduce_scatter", "backward")],
    "reduce_scatter_along_sequence": [("reduce_scatter", "forward"), ("all_gather", "backward")],
    "scatter_to_sequence": [("all_gather", "backward")],
}


def _ranks_tensors(shape, n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]


def _check_ops(rank, world):
    group = dist.group.WORLD
    for i, (name, (op, ref, shape_fn, in_replicated, grad_replicated)) in enumerate(CASES.items()):
        leaves = [x.requires_grad_() for x in _ranks_tensors(shape_fn(world), 1 if in_replicated else world, 10 + i)]
        xs = leaves * world if in_replicated else leaves
        ys = ref(xs, world)
        gs = _ranks_tensors(ys[0].shape, 1 if grad_replicated else world, 100 + i)
        gs = gs * world if grad_replicated else gs
        loss = (ys[0] * gs[0]).sum() if grad_replicated else sum((y * g).sum() for y, g in zip(ys, gs))
        want_dx = torch.autograd.grad(loss, leaves)
        want_dx = want_dx[0] if in_replicated else want_dx[rank]

        x = xs[rank].detach().clone().requires_grad_()
        with comm.CommCounter() as counter:
            y = op(x, group)
            (y * gs[rank]).sum().backward()
        assert_close(y, ys[rank].detach(), msg=name)
        assert_close(x.grad, want_dx, msg=name)

        got = [(r.op, r.phase) for r in counter.records]
        assert got == EXPECTED_RECORDS[name], (name, got)
        full = max(x.numel(), y.numel()) * 8  # N: bytes of the unsharded tensor, fp64
        for r in counter.records:
            assert r.tensor_bytes == full, (name, r)
            assert r.sent_bytes == pytest.approx({"all_reduce": 2}.get(r.op, 1) * (world - 1) / world * full)


def _check_size_one_group_is_identity(rank, world):
    singles = [dist.new_group([r]) for r in range(world)]  # every rank joins every new_group call
    mine = singles[rank]
    x = torch.randn(4, 2, 3, requires_grad=True)
    with comm.CommCounter() as counter:
        for op, *_ in CASES.values():
            assert op(x, mine) is x
    assert counter.records == []


def _check_errors_before_collectives(rank, world):
    group = dist.group.WORLD
    bad = torch.randn(world * 3 + 1, 2, 5)
    for op in (comm.reduce_scatter_along_sequence, comm.scatter_to_sequence):
        with pytest.raises(ValueError, match="not divisible by the tensor-parallel size"):
            op(bad, group)
    with pytest.raises(ValueError, match="not divisible"):
        comm.scatter_last_dim(torch.randn(2, world * 2 + 1), group)


def _check_grad_hook_sums_each_backward_once(rank, world):
    group = dist.group.WORLD
    w = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    comm.all_reduce_grad_hook(w, group)
    comm.all_reduce_grad_hook(w, group)  # second registration must not double the sum
    assert w.sequence_parallel
    contrib = [torch.arange(3, dtype=torch.float64) * (r + 1) for r in range(world)]
    with comm.CommCounter() as counter:
        for micro in range(2):  # gradient accumulation: each micro-batch is summed once
            (w * contrib[rank] * (micro + 1)).sum().backward()
    assert_close(w.grad, sum(contrib) * 3)
    assert [(r.op, r.phase, r.tensor_bytes) for r in counter.records] == [("all_reduce", "grad", 24)] * 2


def _all_checks(rank, world):
    _check_ops(rank, world)
    _check_size_one_group_is_identity(rank, world)
    _check_errors_before_collectives(rank, world)
    _check_grad_hook_sums_each_backward_once(rank, world)


@pytest.mark.parametrize("world", [2, 4])
def test_comm_ops_match_reference(tmp_path, world):
    run_ranks(_all_checks, world, tmp_path)
