"""pretrain.py's loss curve under TP, SP, CP and their combination equals one rank's (fp32, 1e-5)."""

import pytest
from pretrain_utils import train

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


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus):
    return train(tmp_path_factory.mktemp("ref"), "one", 1, corpus + STEPS)


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
        (
            "cp2-allgather-recompute",
            2,
            ["--context-parallel-size", "2", "--cp-comm-type", "all_gather", "--recompute-granularity", "full"],
        ),
    ],
)
def test_loss_curve_equals_one_rank(tmp_path, corpus, reference, name, world, flags):
    assert_same_curve(reference, train(tmp_path, name, world, corpus + STEPS + flags))
