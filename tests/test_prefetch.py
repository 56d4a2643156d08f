"""Background prefetch: same batches in the same order, failures surface, and the curve is unchanged."""

import threading
import traceback

import pytest
import torch
from pretrain_utils import train

from megalite.training.prefetch import Prefetcher


def make_batches(start):
    if start >= 30:
        raise KeyError(f"sample {start} is bad")  # a failure deep inside the data path
    return [{"tokens": torch.arange(start, start + 10)}]


@pytest.mark.parametrize("enabled", [True, False])
def test_same_batches_in_order_and_worker_failure_surfaces(enabled):
    calls = []

    def make(start):
        calls.append((start, threading.current_thread().name))
        return make_batches(start)

    loader = Prefetcher(make, 10, torch.device("cpu"), enabled=enabled)
    for start in (0, 10, 20):
        assert torch.equal(loader.get(start)[0]["tokens"], torch.arange(start, start + 10))
    with pytest.raises(KeyError, match="sample 30 is bad") as info:
        loader.get(30)
    frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    assert "make_batches" in frames  # the worker's own traceback comes with it
    loader.close()
    assert [s for s, _ in calls] == [0, 10, 20, 30]
    # with the worker on, every batch after the first was built in the background thread
    assert {name for _, name in calls[1:]} == ({"megalite-prefetch"} if enabled else {threading.current_thread().name})
    assert not any(t.name == "megalite-prefetch" for t in threading.enumerate())


def test_a_start_out_of_turn_is_built_directly():
    loader = Prefetcher(make_batches, 10, torch.device("cpu"))
    loader.get(0)
    assert torch.equal(loader.get(5)[0]["tokens"], torch.arange(5, 15))  # not the prefetched 10
    loader.close()


def test_loss_curve_is_bitwise_the_same_without_prefetch(tmp_path, corpus):
    steps = corpus + ["--train-iters", "4", "--global-batch-size", "4", "--micro-batch-size", "2"]
    on = train(tmp_path, "on", 1, steps)
    off = train(tmp_path, "off", 1, steps + ["--no-data-prefetch"])
    assert [r["loss"] for r in on] == [r["loss"] for r in off]
    assert [r["grad_norm"] for r in on] == [r["grad_norm"] for r in off]
    assert all(r["data_wait_s"] >= 0 for r in on + off)
