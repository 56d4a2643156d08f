"""Block attention backends and zigzag ring attention, checked against full attention.

Every rank builds the same full-sequence inputs (same seed), computes the full-attention
reference in float64 with torch autograd, and compares its zigzag shard of the outputs and of
the q/k/v gradients with what ring attention produced from the shard alone.
"""

import pytest
import torch
import torch.distributed as dist
from multiproc import run_ranks
from parity import TOL, make_inputs, reference

from megalite.ops.attention import block_attention, get_backend
from megalite.ops.doc_attention import merge_partial
from megalite.parallel.ring_attention import ring_attention
from megalite.parallel.zigzag import zigzag_split

# ---- single process: backends and the merge ----


@pytest.mark.parametrize("backend", ["math", "torch_cpu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [32, 80])
@pytest.mark.parametrize("causal", [True, False])
def test_block_backend_matches_sdpa(backend, dtype, head_dim, causal):
    q, k, v, dout = make_inputs(0, 2, 10, 4, 2, head_dim, dtype)
    if not causal:  # a rectangular block: 10 queries, 6 keys
        k, v = k[:, :6], v[:, :6]
    want = reference(q, k, v, dout, causal)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = block_attention(q, k, v, causal=causal, backend=backend)
    out.backward(dout)
    for got, ref in zip((out, q.grad, k.grad, v.grad), want):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), ref, **TOL[dtype])


@pytest.mark.parametrize("backend", ["math", "torch_cpu"])
def test_backend_lse_and_causal_shape_check(backend):
    q, k, v, _ = make_inputs(1, 1, 8, 2, 1, 32, torch.float64)
    be = get_backend(backend)
    _, lse = be.forward(q, k, v, False, 32**-0.5)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k.expand(-1, -1, 2, -1)) * 32**-0.5
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1))
    with pytest.raises(ValueError, match="Sq == Sk"):
        be.forward(q, k[:, :4], v[:, :4], True, 1.0)


def test_merge_partial_equals_joint_softmax():
    q, k, v, _ = make_inputs(2, 2, 12, 4, 4, 32, torch.float64)
    be = get_backend("math")
    out, lse = be.forward(q, k, v, False, 0.2)
    out_a, lse_a = be.forward(q, k[:, :5], v[:, :5], False, 0.2)
    out_b, lse_b = be.forward(q, k[:, 5:], v[:, 5:], False, 0.2)
    merge_partial(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close(out_a, out)
    torch.testing.assert_close(lse_a, lse)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_cpu_backend_without_native_gqa(dtype):
    """The local K/V repeat used for CPU kernels that predate GQA (torch < ~2.9)."""
    from megalite.ops.attention import TorchCPUBackend

    q, k, v, dout = make_inputs(3, 2, 8, 6, 2, 32, dtype)
    want = reference(q, k, v, dout, True)
    be = TorchCPUBackend(native_gqa=False)
    out, lse = be.forward(q, k, v, True, 32**-0.5)
    grads = be.backward(dout, q, k, v, out, lse, True, 32**-0.5)
    for got, ref in zip((out, *grads), want):
        assert got.shape == ref.shape
        torch.testing.assert_close(got.double(), ref, **TOL[dtype])


def test_unknown_and_unavailable_backends():
    with pytest.raises(ValueError, match="unknown attention backend"):
        get_backend("nope")
    with pytest.raises(ValueError, match="needs CUDA"):
        get_backend("torch_cuda", "cpu", torch.bfloat16)
    assert get_backend("auto", "cpu", torch.bfloat16).name == "torch_cpu"


# ---- multi-rank ring ----

CASES = [  # (causal, heads, kv_heads, head_dim, dtype, backend)
    (True, 4, 4, 32, torch.float64, "auto"),
    (True, 4, 2, 80, torch.float64, "auto"),
    (True, 6, 2, 32, torch.float64, "math"),
    (False, 4, 2, 32, torch.float64, "auto"),
    (False, 4, 1, 80, torch.float64, "math"),
    (True, 4, 2, 32, torch.float32, "auto"),
    (True, 4, 2, 80, torch.float32, "auto"),
    (False, 4, 2, 32, torch.float32, "auto"),
    (True, 4, 2, 32, torch.bfloat16, "auto"),
    (True, 4, 1, 80, torch.bfloat16, "auto"),
    (False, 4, 2, 80, torch.bfloat16, "auto"),
]


def _ring_vs_full(rank, world):
    group = dist.new_group(list(range(world)))  # a real subgroup object, as in training
    chunk = 3  # odd chunk length: slicing by halves must not assume powers of two
    for i, (causal, heads, kv_heads, head_dim, dtype, backend) in enumerate(CASES):
        q, k, v, dout = make_inputs(100 + i, 2, 2 * world * chunk, heads, kv_heads, head_dim, dtype)
        want = [zigzag_split(t, 1, world, rank) for t in reference(q, k, v, dout, causal)]
        ql, kl, vl = (zigzag_split(t, 1, world, rank).requires_grad_() for t in (q, k, v))
        out = ring_attention(ql, kl, vl, group, causal=causal, backend=backend)
        out.backward(zigzag_split(dout, 1, world, rank))
        for name, got, ref in zip(("out", "dq", "dk", "dv"), (out, ql.grad, kl.grad, vl.grad), want):
            assert got.dtype == dtype and got.shape == ref.shape, name
            torch.testing.assert_close(got.double(), ref, **TOL[dtype], msg=lambda m: f"case {CASES[i]} {name}: {m}")


@pytest.mark.parametrize("world", [2, 4])
def test_ring_matches_full_attention(tmp_path, world):
    run_ranks(_ring_vs_full, world, tmp_path)


def _ring_size_one(rank, world):
    group = [dist.new_group([r]) for r in range(world)][rank]  # size 1: plain causal attention
    q, k, v, dout = make_inputs(7, 1, 6, 2, 1, 32, torch.float64)
    want = reference(q, k, v, dout, True)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = ring_attention(q, k, v, group)
    out.backward(dout)
    for got, ref in zip((out, q.grad, k.grad, v.grad), want):
        torch.testing.assert_close(got, ref)
    with pytest.raises(ValueError, match="expects q"):
        ring_attention(q, k[:, :4], v[:, :4], group)


def test_ring_size_one_group_is_plain_attention(tmp_path):
    run_ranks(_ring_size_one, 2, tmp_path)
