"""Zigzag sharding (flat and hierarchical), CP validation, and every --cp-comm-type attention
against full attention."""

import pytest
import torch
import torch.distributed as dist
from multiproc import run_ranks
from parity import TOL, make_inputs, reference

from megalite.config import ConfigError, ModelConfig, ParallelConfig
from megalite.parallel.apply_cp import ContextParallelAttention, validate_cp
from megalite.parallel.dims import ParallelDims
from megalite.parallel.zigzag import zigzag_merge, zigzag_positions, zigzag_split


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_zigzag_split_merge_round_trip(cp):
    x = torch.arange(2 * 2 * cp * 5 * 3).view(2, 2 * cp * 5, 3)  # [b, s, h], s = 2*CP*5
    pieces = [zigzag_split(x, 1, cp, r) for r in range(cp)]
    assert all(p.shape == (2, 10, 3) for p in pieces)
    torch.testing.assert_close(zigzag_merge(pieces, 1), x)
    torch.testing.assert_close(zigzag_merge(torch.cat(pieces, 1), 1, cp), x)


@pytest.mark.parametrize("cp, inner", [(2, 2), (4, 2), (4, 4), (6, 3)])
def test_hierarchical_zigzag(cp, inner):
    x = torch.arange(2 * cp * 3).view(1, 2 * cp * 3)  # s = 2*CP*3
    pieces = [zigzag_split(x, 1, cp, r, inner) for r in range(cp)]
    torch.testing.assert_close(zigzag_merge(pieces, 1, inner=inner), x)
    torch.testing.assert_close(zigzag_merge(torch.cat(pieces, 1), 1, cp, inner), x)
    # What the all-to-all gathers inside group p is that group's flat zigzag pair over CP/inner.
    outer = cp // inner
    for p in range(outer):
        group = pieces[p * inner : (p + 1) * inner]
        torch.testing.assert_close(zigzag_merge(group, 1, inner=inner), zigzag_split(x, 1, outer, p))
    assert zigzag_positions(16, 4, 1, inner=2).tolist() == [2, 3, 14, 15]
    with pytest.raises(ValueError, match="inner all-to-all size 3 does not divide the context-parallel size 4"):
        zigzag_split(x[:, :16], 1, 4, 0, 3)


def test_zigzag_chunks_and_positions():
    pos = [zigzag_positions(16, 4, r).tolist() for r in range(4)]
    assert pos[0] == [0, 1, 14, 15] and pos[1] == [2, 3, 12, 13] and pos[3] == [6, 7, 8, 9]
    assert sorted(sum(pos, [])) == list(range(16))
    # Labels are shifted on the whole sequence first, so each label stays next to its token.
    tokens = torch.arange(17)
    inp, labels = tokens[:-1], tokens[1:]
    for r in range(4):
        torch.testing.assert_close(zigzag_split(labels, 0, 4, r), zigzag_split(inp, 0, 4, r) + 1)


def test_zigzag_bad_input():
    with pytest.raises(ValueError, match="not divisible by 2 x context-parallel size 4 = 8"):
        zigzag_split(torch.zeros(1, 12), 1, 4, 0)
    with pytest.raises(ValueError, match="cp_rank 2"):
        zigzag_split(torch.zeros(1, 8), 1, 2, 2)
    with pytest.raises(ValueError, match="needs cp_size"):
        zigzag_merge(torch.zeros(1, 8), 1)


def test_validate_cp():
    cfg = ModelConfig(seq_length=64, num_attention_heads=8, group_query_attention=True, num_query_groups=2)
    for comm in ("p2p", "all_gather"):
        validate_cp(cfg, 4, comm, tp=2)
    validate_cp(cfg, 2, "a2a")
    with pytest.raises(ConfigError, match="--seq-length 64 is not divisible by 2 x --context-parallel-size 64"):
        validate_cp(cfg, 64, "p2p")
    with pytest.raises(
        ConfigError, match=r"kv heads per TP rank \(2\) must both be divisible by --context-parallel-size 4"
    ):
        validate_cp(cfg, 4, "a2a")
    validate_cp(cfg, 4, "a2a+p2p", a2a_size=2)
    validate_cp(cfg, 4, "a2a+p2p", tp=2, a2a_size=2)  # 1 kv head per TP rank, repeated over A = 2
    with pytest.raises(ConfigError, match=r"query heads per TP rank \(4\) must be divisible by A"):
        validate_cp(cfg, 8, "a2a+p2p", tp=2, a2a_size=8)
    with pytest.raises(ValueError, match=r"a2a\+p2p takes the pair"):
        ContextParallelAttention(None, "a2a+p2p")
    with pytest.raises(ConfigError, match="--cp-comm-type 'ring'"):
        validate_cp(cfg, 2, "ring")
    cfg.attention_dropout = 0.1
    with pytest.raises(ConfigError, match="--attention-dropout"):
        validate_cp(cfg, 2, "p2p")


CASES = [  # (causal, heads, kv_heads, head_dim, dtype)
    (True, 8, 4, 32, torch.float64),
    (True, 8, 8, 80, torch.float64),
    (False, 8, 4, 32, torch.float64),
    (True, 8, 4, 32, torch.float32),
    (True, 8, 4, 80, torch.bfloat16),
]


def _hierarchical(world, a):
    """(groups, A) of --cp-comm-type a2a+p2p with sizes A, world / A over all ranks."""
    sizes = [a, world // a]
    dims = ParallelDims.build(
        ParallelConfig(context_parallel_size=world, cp_comm_type="a2a+p2p", hierarchical_context_parallel_sizes=sizes)
    )
    return (dims.cp_a2a_group, dims.cp_ring_group), a


def _variants_agree(rank, world):
    group = dist.new_group(list(range(world)))
    # (name, group(s), inner): a2a+p2p at A=2, P=2 on 4 ranks; both degenerate splits on 2.
    layouts = [(comm, group, 1) for comm in ("p2p", "all_gather", "a2a")]
    layouts += [("a2a+p2p", *_hierarchical(world, a)) for a in ((1, 2) if world == 2 else (2,))]
    chunk = 5
    for i, (causal, heads, kv_heads, head_dim, dtype) in enumerate(CASES):
        q, k, v, dout = make_inputs(200 + i, 2, 2 * world * chunk, heads, kv_heads, head_dim, dtype)
        full = reference(q, k, v, dout, causal)
        results = {}
        for comm, grp, inner in layouts:
            want = [zigzag_split(t, 1, world, rank, inner) for t in full]
            ql, kl, vl = (zigzag_split(t, 1, world, rank, inner).requires_grad_() for t in (q, k, v))
            out = ContextParallelAttention(grp, comm, causal=causal)(ql, kl, vl)
            out.backward(zigzag_split(dout, 1, world, rank, inner))
            results[comm] = (out, ql.grad, kl.grad, vl.grad)
            for name, got, ref in zip(("out", "dq", "dk", "dv"), results[comm], want):
                assert got.dtype == dtype, (comm, name)
                torch.testing.assert_close(
                    got.double(), ref, **TOL[dtype], msg=lambda m: f"{comm} case {CASES[i]} {name}: {m}"
                )
        if dtype == torch.float64:  # the three are the same computation up to summation order
            for comm in ("all_gather", "a2a"):
                for got, ring in zip(results[comm], results["p2p"]):
                    torch.testing.assert_close(got, ring, atol=1e-12, rtol=1e-12)
    # a2a refuses heads that do not split over the group, naming the fix.
    if world > 1:
        q, k, v, dout = make_inputs(0, 1, 2 * world, 2 * world, 1, 32, torch.float64)
        with pytest.raises(ValueError, match="use p2p or all_gather"):
            ContextParallelAttention(group, "a2a")(q, k, v)
        # a2a+p2p repeats KV heads fewer than A (here 1 for A = 2) instead of refusing them.
        groups, inner = layouts[-1][1:]
        want = [zigzag_split(t, 1, world, rank, inner) for t in reference(q, k, v, dout, True)]
        ql, kl, vl = (zigzag_split(t, 1, world, rank, inner).requires_grad_() for t in (q, k, v))
        out = ContextParallelAttention(groups, "a2a+p2p")(ql, kl, vl)
        out.backward(zigzag_split(dout, 1, world, rank, inner))
        for got, ref in zip((out, ql.grad, kl.grad, vl.grad), want):
            torch.testing.assert_close(got, ref)
        with pytest.raises(ValueError, match="divisible by A"):
            ContextParallelAttention(groups, "a2a+p2p")(ql[:, :, :3], kl, vl)


@pytest.mark.parametrize("world", [2, 4])
def test_comm_types_match_full_attention(tmp_path, world):
    run_ranks(_variants_agree, world, tmp_path)


def test_readme_import_path_still_works():
    from megalite.parallel import context_parallel, zigzag

    assert context_parallel.zigzag_split is zigzag.zigzag_split
    assert context_parallel.zigzag_merge is zigzag.zigzag_merge
