"""pretrain.py's loss curve under TP, SP, CP and their combination equals one rank's (fp32, 1e-5),
also on packed documents of random lengths with Megatron's document flags on. The reference
materialises all logits (--loss-chunk-size 0); the other runs use the token-tiled output layer +
loss (one chunk by default here, several in the tiled rows, with a tiled MLP)."""

import numpy as np
import pytest
from pretrain_utils import train

from megalite.data.indexed import IndexedDataset, IndexedDatasetBuilder

STEPS = [
    "--train-iters",
    "5",
    "--global-batch-size",
    "4",
    "--micro-batch-size",
    "2",
    "--swiglu",
    "--normalization",
    "RMSNorm",
    "--group-query-attention",
    "--num-query-groups",
    "2",
]
OG = ["--data-parallel-sharding-strategy", "optim_grads"]
OGP = ["--data-parallel-sharding-strategy", "optim_grads_params"]

HIER_CP4 = [
    "--context-parallel-size",
    "4",
    "--cp-comm-type",
    "a2a+p2p",
    "--hierarchical-context-parallel-sizes",
    "2",
    "2",
]
TILED = ["--loss-chunk-size", "24", "--mlp-tile-size", "12"]  # 64 tokens a micro-batch: ragged chunks and tiles


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus):
    return train(tmp_path_factory.mktemp("ref"), "one", 1, corpus + STEPS + ["--loss-chunk-size", "0"])


def assert_same_curve(ref, got):
    assert [r["iteration"] for r in got] == [r["iteration"] for r in ref]
    for a, b in zip(ref, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a["iteration"], a["loss"], b["loss"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert got[-1]["valid_loss"] == pytest.approx(ref[-1]["valid_loss"], rel=1e-5)


@pytest.mark.parametrize(
    "name, world, flags",
    [
        ("tp2-sp", 2, ["--tensor-parallel-size", "2", "--sequence-parallel"]),
        ("cp2", 2, ["--context-parallel-size", "2"]),
        ("tp2-cp2-sp", 4, ["--tensor-parallel-size", "2", "--context-parallel-size", "2", "--sequence-parallel"]),
        ("cp2-dp2-a2a", 4, ["--context-parallel-size", "2", "--cp-comm-type", "a2a"]),
        ("tp2-sp-tiled", 2, ["--tensor-parallel-size", "2", "--sequence-parallel", *TILED]),
        ("cp2-tiled-recompute", 2, ["--context-parallel-size", "2", "--recompute-granularity", "full", *TILED]),
        ("cp4-a2a+p2p", 4, HIER_CP4),
        (
            "cp2-allgather-recompute",
            2,
            ["--context-parallel-size", "2", "--cp-comm-type", "all_gather", "--recompute-granularity", "full"],
        ),
        # Sharded data parallel (FSDP2): every strategy, with and without overlap, at DP2, DP2xTP2,
        # DP2xCP2 (no_shard without overlap: the cp2-dp2-a2a row; more layouts in test_sharded.py's resumes)
        ("dp2-noshard-overlap", 2, ["--overlap-grad-reduce"]),
        ("dp2-optim", 2, ["--use-distributed-optimizer"]),
        ("dp2-ogp-overlap", 2, [*OGP, "--overlap-grad-reduce", "--overlap-param-gather"]),
        ("dp2-tp2-sp-og", 4, ["--tensor-parallel-size", "2", "--sequence-parallel", *OG]),
        (
            "dp2-cp2-og-overlap",
            4,
            ["--context-parallel-size", "2", *OG, "--overlap-grad-reduce", "--overlap-param-gather"],
        ),
    ],
)
def test_loss_curve_equals_one_rank(tmp_path, corpus, reference, name, world, flags):
    assert_same_curve(reference, train(tmp_path, name, world, corpus + STEPS + flags))


# ---- packed documents: every layout, with the three document flags ----

DOCS = ["--reset-position-ids", "--reset-attention-mask", "--eod-mask-loss"]


@pytest.fixture(scope="module")
def packed_corpus(tmp_path_factory, corpus):
    """The corpus's tokens re-cut into documents of 1 to 24 tokens (EOD included; CP chunks are 8
    tokens at CP2, 4 at CP4) and a few longer than a sample, so every boundary case occurs."""
    src = IndexedDataset(corpus[1])
    eod = int(src.tokens[src.offsets[0] + src.sizes[0] - 1])
    text = src.tokens[src.tokens != eod]
    rng = np.random.default_rng(0)
    prefix = str(tmp_path_factory.mktemp("packed") / "docs")
    builder = IndexedDatasetBuilder(prefix, src.vocab_size, src.tokenizer_fingerprint)
    start = 0
    while start < len(text):
        n = int(rng.choice([1, 40]) if rng.random() < 0.15 else rng.integers(2, 25))
        builder.add_document(list(text[start : start + n - 1]) + [eod])
        start += n - 1
    builder.finalize()
    return ["--data-path", prefix, *corpus[2:]]


@pytest.fixture(scope="module")
def packed_reference(tmp_path_factory, packed_corpus):
    return train(tmp_path_factory.mktemp("packed-ref"), "one", 1, packed_corpus + STEPS + DOCS)


@pytest.mark.parametrize(
    "name, world, flags",
    [
        (
            "tp2-sp-selective",
            2,
            ["--tensor-parallel-size", "2", "--sequence-parallel", "--recompute-granularity", "selective"],
        ),
        ("cp2-p2p-full", 2, ["--context-parallel-size", "2", "--recompute-granularity", "full"]),
        ("cp2-allgather", 2, ["--context-parallel-size", "2", "--cp-comm-type", "all_gather"]),
        ("cp2-dp2-a2a", 4, ["--context-parallel-size", "2", "--cp-comm-type", "a2a"]),
        ("cp4", 4, ["--context-parallel-size", "4"]),
        ("cp4-a2a+p2p", 4, HIER_CP4),
    ],
)
def test_packed_documents_loss_curve_equals_one_rank(tmp_path, packed_corpus, packed_reference, name, world, flags):
    assert_same_curve(packed_reference, train(tmp_path, name, world, packed_corpus + STEPS + DOCS + flags))


def test_packed_documents_bf16_and_flags_matter(tmp_path, packed_corpus, packed_reference):
    """bf16 at CP2 tracks bf16 on one rank (to bf16's rounding), and the flags reach the model:
    without them the same data gives another curve."""
    one = train(tmp_path, "bf16-one", 1, packed_corpus + STEPS + DOCS + ["--bf16"])
    cp2 = train(tmp_path, "bf16-cp2", 2, packed_corpus + STEPS + DOCS + ["--bf16", "--context-parallel-size", "2"])
    assert [r["iteration"] for r in cp2] == [r["iteration"] for r in one] == list(range(1, 6))
    for a, b in zip(one, cp2):
        assert b["loss"] == pytest.approx(a["loss"], rel=3e-4), (a["iteration"], a["loss"], b["loss"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=3e-3)
    plain = train(tmp_path, "plain", 1, packed_corpus + STEPS)
    for a, b in zip(packed_reference, plain):
        assert abs(a["loss"] - b["loss"]) > 1e-3 * a["loss"], (a["iteration"], a["loss"], b["loss"])


@pytest.mark.slow
def test_hierarchical_cp_with_tp_sp_curve_equals_one_rank(tmp_path, corpus, reference):
    """TP=2 + SP x CP=4 as A=2 all-to-all x P=2 ring: 8 ranks."""
    flags = ["--tensor-parallel-size", "2", "--sequence-parallel", "--context-parallel-size", "4"]
    flags += ["--cp-comm-type", "a2a+p2p", "--hierarchical-context-parallel-sizes", "2", "2"]
    assert_same_curve(reference, train(tmp_path, "tp2-sp-cp4-a2a+p2p", 8, corpus + STEPS + flags))
