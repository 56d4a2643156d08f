"""Attention over packed documents (``document_ids``), checked against a dense float64 reference
(explicit mask + softmax): single rank, and the context-parallel attentions at CP = 2, 4 (the
hierarchical a2a+p2p at A x P = 2 x 2, and 1 x 2, 2 x 1)."""

import types

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from multiproc import run_ranks
from parity import TOL, make_inputs

from megalite.config import ParallelConfig
from megalite.ops.attention import block_attention, causal_attention, get_backend
from megalite.ops.doc_attention import Pair, document_spans, merge_partial, plan_pairs, run_forward
from megalite.parallel.all_gather_attention import all_gather_attention, all_gather_plan
from megalite.parallel.apply_cp import ContextParallelAttention
from megalite.parallel.dims import ParallelDims
from megalite.parallel.hierarchical_attention import hierarchical_attention
from megalite.parallel.ring_attention import ring_attention, ring_plans
from megalite.parallel.ulysses_attention import ulysses_attention
from megalite.parallel.zigzag import zigzag_positions, zigzag_split


def doc_ids(seed, batch, seq, longest):
    """(batch, seq) non-decreasing ids with gaps, documents 1..longest tokens long. Row 0 has
    1-token documents at both ends and one document over everything between (every CP rank)."""
    gen = torch.Generator().manual_seed(seed)
    rows = [[0, 1] + [5] * (seq - 4) + [6, 9]]
    while len(rows) < batch:
        row, doc = [], int(torch.randint(0, 50, (1,), generator=gen))
        while len(row) < seq:
            row += [doc] * int(torch.randint(1, longest + 1, (1,), generator=gen))
            doc += int(torch.randint(1, 4, (1,), generator=gen))
        rows.append(row[:seq])
    return torch.tensor(rows)


def dense_reference(q, k, v, dout, ids, causal):
    """out, dq, dk, dv in float64 with the S x S document mask materialised."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    mask = ids[:, :, None] == ids[:, None, :]  # (B, S, S)
    if causal:
        mask &= torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
    out = F.scaled_dot_product_attention(
        *(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask[:, None], enable_gqa=True
    ).transpose(1, 2)
    out.backward(dout.double())
    return out.detach(), q.grad, k.grad, v.grad


def assert_matches(got, want, dtype, what=""):
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.dtype == dtype and g.shape == w.shape, name
        torch.testing.assert_close(g.double(), w, **TOL[dtype], msg=lambda m: f"{what} {name}: {m}")


def _run(fn, q, k, v, dout):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(dout)
    return out, q.grad, k.grad, v.grad


class CountingBackend:
    """A block backend stand-in that counts kernel calls of the backend it wraps."""

    def __init__(self, name="torch_cpu"):
        self.inner, self.forwards, self.backwards = get_backend(name), 0, 0

    def forward(self, *args):
        self.forwards += 1
        return self.inner.forward(*args)

    def backward(self, *args):
        self.backwards += 1
        return self.inner.backward(*args)


# ---- single rank ----


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_causal_attention_with_documents(dtype):
    q, k, v, dout = make_inputs(0, 3, 19, 4, 2, 16, dtype)
    ids = doc_ids(1, 3, 19, 5)
    got = _run(lambda *t: causal_attention(*t, document_ids=ids), q, k, v, dout)
    assert_matches(got, dense_reference(q, k, v, dout, ids, True), dtype)


def test_causal_attention_documents_flash_varlen_bookkeeping(monkeypatch):
    """The flash-attn path: one varlen call whose cu_seqlens cut at every document and row edge
    (a CPU stand-in computes each cut sequence with causal SDPA)."""
    calls = []

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, causal=False):
        assert cu_q is cu_k and cu_q.dtype == torch.int32 and causal and dropout_p == 0.0
        calls.append(cu_q.tolist())
        edges = cu_q.tolist()
        assert max_q == max_k == max(b - a for a, b in zip(edges, edges[1:]))
        parts = [
            F.scaled_dot_product_attention(
                *(t[a:b].transpose(0, 1) for t in (q, k, v)), is_causal=True, enable_gqa=True
            ).transpose(0, 1)
            for a, b in zip(edges, edges[1:])
        ]
        return torch.cat(parts)

    monkeypatch.setitem(__import__("sys").modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=varlen))
    q, k, v, dout = make_inputs(2, 2, 9, 4, 1, 16, torch.float64)
    ids = torch.tensor([[3, 3, 4, 4, 4, 4, 4, 8, 8], [0, 0, 0, 0, 0, 0, 0, 0, 1]])
    got = _run(lambda *t: causal_attention(*t, document_ids=ids, require_flash_attn=True), q, k, v, dout)
    assert calls == [[0, 2, 7, 9, 17, 18]]
    assert_matches(got, dense_reference(q, k, v, dout, ids, True), torch.float64)


@pytest.mark.parametrize("backend", ["math", "torch_cpu"])
@pytest.mark.parametrize("causal", [True, False])
def test_block_attention_with_documents(backend, causal):
    q, k, v, dout = make_inputs(3, 2, 17, 6, 2, 16, torch.float64)
    ids = doc_ids(4, 2, 17, 6)
    got = _run(lambda *t: block_attention(*t, causal=causal, backend=backend, document_ids=ids), q, k, v, dout)
    assert_matches(got, dense_reference(q, k, v, dout, ids, causal), torch.float64)


def test_one_kernel_call_per_visible_pair():
    """Whole sequence, causal: one causal square per document run, nothing across documents."""
    q, k, v, dout = make_inputs(5, 2, 16, 2, 2, 8, torch.float64)
    ids = doc_ids(6, 2, 16, 4)
    counter = CountingBackend()
    _run(lambda *t: block_attention(*t, backend=counter, document_ids=ids), q, k, v, dout)
    docs = sum(len(set(row.tolist())) for row in ids)
    assert counter.forwards == counter.backwards == docs


def test_plan_splits_key_runs_at_query_positions():
    """Queries of one zigzag chunk against whole-document keys: a rectangle over the earlier keys
    plus a causal square, clipped to the document."""
    ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    whole = document_spans(ids, [(0, 8, 0)])
    chunk = document_spans(ids[:, 4:6], [(0, 2, 4)])  # global positions 4, 5: document 1
    pairs = plan_pairs(chunk, whole, causal=True)
    assert [(p.q, p.k, p.causal) for p in pairs] == [
        (slice(0, 2), slice(3, 4), False),
        (slice(0, 2), slice(4, 6), True),
    ]


def test_uncovered_rows_merge_as_minus_inf():
    """Rows no pair covers come out lse = -inf and out = 0 (not the kernel's lse = 0 of a fully
    masked row), and merging them into finite accumulators changes nothing."""
    q, k, v, _ = make_inputs(8, 1, 6, 2, 2, 8, torch.float64)
    be = get_backend("torch_cpu")
    out, lse = run_forward(be, q, k, v, [Pair(slice(0, 1), slice(0, 3), slice(0, 3), True)], 0.3)
    assert torch.isneginf(lse[:, :, 3:]).all() and not out[:, 3:].any() and lse[:, :, :3].isfinite().all()
    acc_out, acc_lse = be.forward(q, k, v, False, 0.3)
    want = acc_out.clone(), acc_lse.clone()
    merge_partial(acc_out[:, 3:], acc_lse[:, :, 3:], out[:, 3:], lse[:, :, 3:])
    torch.testing.assert_close((acc_out, acc_lse), want, atol=0, rtol=0)


@pytest.mark.parametrize("cp", [2, 4, 8])
def test_cp_plans_cover_the_mask_exactly_once(cp):
    """Every visible (query, key) of the sample is computed exactly once over all ranks (and ring
    steps), nothing invisible at all: checked on the plans, without spawning ranks."""
    seq, chunk = 2 * cp * 3, 3
    ids = doc_ids(20 + cp, 3, seq, 3 * chunk)
    mask = (ids[:, :, None] == ids[:, None, :]) & torch.ones(seq, seq, dtype=torch.bool).tril()
    layouts = [  # (plans of each ring step on a rank, global positions of the keys at that step)
        (lambda r: ring_plans(cp, r, seq // cp, True, ids), lambda r, i: zigzag_positions(seq, cp, (r - i) % cp)),
        (lambda r: [all_gather_plan(cp, r, seq // cp, True, ids)], lambda r, i: torch.arange(seq)),
    ]
    for plans_of, key_positions in layouts:
        hits = torch.zeros(ids.shape[0], seq, seq, dtype=torch.long)
        for rank in range(cp):
            qpos = zigzag_positions(seq, cp, rank)
            for step, plan in enumerate(plans_of(rank)):
                kpos = key_positions(rank, step)
                for p in plan:
                    block = torch.ones(p.q.stop - p.q.start, p.k.stop - p.k.start, dtype=torch.long)
                    hits[p.rows, qpos[p.q, None], kpos[None, p.k]] += block.tril() if p.causal else block
        assert torch.equal(hits, mask.long())


def test_bad_document_ids():
    q, k, v, _ = make_inputs(7, 2, 6, 2, 2, 8, torch.float32)
    with pytest.raises(ValueError, match="decrease along the global sequence"):
        causal_attention(q, k, v, document_ids=torch.tensor([[0, 0, 1, 1, 2, 2], [0, 1, 1, 0, 2, 2]]))
    with pytest.raises(ValueError, match="shape"):
        causal_attention(q, k, v, document_ids=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        block_attention(q, k, v, document_ids=torch.zeros(2, 6))


# ---- context parallel ----


def _module(comm_type):
    def attend(q, k, v, group, *, causal, document_ids, backend="auto"):
        assert causal and backend == "auto"
        return ContextParallelAttention(group, comm_type)(q, k, v, document_ids=document_ids)

    return attend


def cp_cases(world):  # (attention, causal, heads, kv_heads, dtype, backend)
    return [
        (ring_attention, True, 4, 2, torch.float64, "auto"),
        (ring_attention, False, 4, 2, torch.float64, "auto"),
        (ring_attention, True, 6, 2, torch.float64, "math"),
        (ring_attention, True, 4, 1, torch.float32, "auto"),
        (_module("p2p"), True, 4, 2, torch.float64, "auto"),
        (all_gather_attention, True, 4, 2, torch.float64, "auto"),
        (all_gather_attention, False, 6, 2, torch.float64, "auto"),
        (_module("all_gather"), True, 4, 1, torch.float32, "auto"),
        (ulysses_attention, True, 2 * world, world, torch.float64, "auto"),
        (ulysses_attention, False, 2 * world, world, torch.float64, "auto"),
        (_module("a2a"), True, 2 * world, world, torch.float32, "auto"),
    ]


def visible_chunk_pairs(ids, world):
    """Independent count of the kernel calls a ring must make: per row, per (query chunk a, key
    chunk b <= a) of the natural order, the documents present in both chunks."""
    chunks = ids.chunk(2 * world, dim=1)
    return sum(
        len(set(chunks[a][row].tolist()) & set(chunks[b][row].tolist()))
        for row in range(ids.shape[0])
        for a in range(2 * world)
        for b in range(a + 1)
    )


def _cp_vs_dense(rank, world):
    group = dist.new_group(list(range(world)))
    chunk = 3  # documents up to 7 tokens: longer than a chunk, up to 3 chunks
    seq = 2 * world * chunk

    def local(t):
        return zigzag_split(t, 1, world, rank)

    for i, (attend, causal, heads, kv_heads, dtype, backend) in enumerate(cp_cases(world)):
        q, k, v, dout = make_inputs(200 + i, 3, seq, heads, kv_heads, 16, dtype)
        ids = doc_ids(300 + i, 3, seq, 2 * chunk + 1)
        want = [local(t) for t in dense_reference(q, k, v, dout, ids, causal)]

        def fn(*t):
            return attend(*t, group, causal=causal, backend=backend, document_ids=local(ids))

        assert_matches(_run(fn, *(local(t) for t in (q, k, v, dout))), want, dtype, f"case {i}")

    # a2a+p2p: q/k/v and ids in the hierarchical layout; KV heads 1 < A = 2 are repeated.
    for a in (1, 2) if world == 2 else (2,):
        sizes = [a, world // a]
        dims = ParallelDims.build(
            ParallelConfig(
                context_parallel_size=world, cp_comm_type="a2a+p2p", hierarchical_context_parallel_sizes=sizes
            )
        )
        groups = (dims.cp_a2a_group, dims.cp_ring_group)

        def hier(t, a=a):
            return zigzag_split(t, 1, world, rank, a)

        for j, (causal, kv_heads) in enumerate([(True, 2), (True, 1), (False, 2)]):
            q, k, v, dout = make_inputs(400 + j, 3, seq, 4, kv_heads, 16, torch.float64)
            ids = doc_ids(500 + j, 3, seq, 2 * chunk + 1)
            want = [hier(t) for t in dense_reference(q, k, v, dout, ids, causal)]

            def fn(*t, causal=causal, ids=ids):
                return hierarchical_attention(*t, groups, causal=causal, document_ids=hier(ids))

            assert_matches(_run(fn, *(hier(t) for t in (q, k, v, dout))), want, torch.float64, f"a2a+p2p {sizes}")

    # No wasted work: one forward and one backward call per visible (query run, key run) pair.
    q, k, v, dout = (local(t) for t in make_inputs(9, 3, seq, 4, 2, 8, torch.float64))
    for ids in (doc_ids(10, 3, seq, 2 * chunk + 1), torch.arange(2 * world).repeat_interleave(chunk).expand(2, -1)):
        counter = CountingBackend()
        n = ids.shape[0]
        _run(
            lambda *t: ring_attention(*t, group, backend=counter, document_ids=local(ids)),
            q[:n],
            k[:n],
            v[:n],
            dout[:n],
        )
        calls = torch.tensor([counter.forwards, counter.backwards])
        dist.all_reduce(calls, group=group)
        assert calls.tolist() == [visible_chunk_pairs(ids, world)] * 2
    # Documents inside single chunks: every step after the first has nothing to compute.
    assert all(not plan for plan in ring_plans(world, rank, seq // world, True, ids)[1:])

    # Bad ids raise on every rank alike (shapes before any collective).
    good = local(doc_ids(11, 3, seq, 4))
    across = local(torch.arange(2 * world, 0, -1).repeat_interleave(chunk).expand(3, -1))
    for attend in (ring_attention, all_gather_attention, ulysses_attention):
        h = 2 * world
        q, k, v, _ = (local(t) for t in make_inputs(12, 3, seq, h, world, 8, torch.float32))
        for bad in (across, good.flip(1) if rank == 0 else good):  # decreasing across ranks / on one rank
            with pytest.raises(ValueError, match="decrease along the global"):
                attend(q, k, v, group, document_ids=bad)
        with pytest.raises(ValueError, match="shape"):
            attend(q, k, v, group, document_ids=good[:, 1:])


@pytest.mark.parametrize("world", [2, 4])
def test_cp_attention_with_documents(tmp_path, world):
    run_ranks(_cp_vs_dense, world, tmp_path)
