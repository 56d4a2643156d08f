"""Non-finite loss or gradient: the update is skipped identically on every rank and logged, the run
stops after --max-skipped-steps skips in a row, and no checkpoint is written with non-finite values."""

import math
import os

import pytest
import torch
from multiproc import run_ranks
from pretrain_utils import TINY, losses, run_pretrain, train

from megalite.parallel.data_parallel import local
from megalite.training import checkpoint, loop
from megalite.training.main import main

pytestmark = pytest.mark.fault("nonfinite")

BAD_ITER = 3
FLAGS = ["--train-iters", "5", "--global-batch-size", "4", "--micro-batch-size", "2", "--eval-interval", "0"]


def _state(model, optimizer):
    """This rank's weights and optimizer state (its FSDP2 pieces under data parallel)."""
    opt = {i: {k: local(v).clone() for k, v in s.items()} for i, s in optimizer.state_dict()["state"].items()}
    return {k: local(v).clone() for k, v in model.state_dict().items()}, opt


def _bitwise_equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_bitwise_equal(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(map(_bitwise_equal, a, b))
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


def _poisoned_main(rank, world, argv, bad_rank, value):
    """main(argv) where rank `bad_rank` alone gets `value` in one gradient entry of a replicated
    parameter at BAD_ITER, after the DP x CP all-reduce, so that only the flag can tell the others.
    Every rank checks that this update leaves weights and optimizer state bitwise unchanged and
    that every other update changes them."""
    real_clip, real_step = loop.clip_grad_norm, loop.train_step
    done = {"steps": 0, "target": None}

    def clip(params, *args):
        if rank == bad_rank and done["steps"] + 1 == BAD_ITER:
            local(done["target"].grad).view(-1)[0] = value
        return real_clip(params, *args)

    def step(model, optimizer, *args):
        done["target"] = model.final_norm.weight  # replicated under TP, CP and DP
        before = _state(model, optimizer)
        result = real_step(model, optimizer, *args)
        done["steps"] += 1
        unchanged = _bitwise_equal(before, _state(model, optimizer))
        assert result.skipped == unchanged == (done["steps"] == BAD_ITER), (rank, done["steps"], result)
        return result

    loop.clip_grad_norm, loop.train_step = clip, step
    main(argv)


def _run(tmp_path, name, world, argv, bad_rank, value):
    out = tmp_path / name
    run_ranks(_poisoned_main, world, tmp_path / f"spawn-{name}", TINY + argv + ["--log-dir", str(out)], bad_rank, value)
    return losses(out)


def test_nonfinite_gradient_on_one_rank_is_skipped_by_every_rank(tmp_path, corpus, record_property):
    argv = corpus + FLAGS
    ref = _run(tmp_path, "one-rank", 1, argv, 0, math.nan)
    assert [r["skipped"] for r in ref] == [i == BAD_ITER for i in range(1, 6)]
    assert [r["skipped_iterations"] for r in ref] == [0, 0, 1, 1, 1]
    assert [r["consumed_samples"] for r in ref] == [4, 8, 12, 16, 20]  # the data position still advances
    assert all(math.isfinite(r["loss"]) for r in ref) and ref[-1]["loss"] < ref[0]["loss"]
    layouts = {
        "dp2": ([], math.nan),
        "tp2": (["--tensor-parallel-size", "2"], math.inf),
        "cp2": (["--context-parallel-size", "2"], -math.inf),
    }
    worst = 0.0
    for name, (extra, value) in layouts.items():
        got = _run(tmp_path, name, 2, argv + extra, 1, value)
        assert [r["skipped"] for r in got] == [r["skipped"] for r in ref], name
        for a, b in zip(ref, got):  # the same curve as one rank whose schedule skipped that batch
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (name, a, b)
            worst = max(worst, abs(b["loss"] / a["loss"] - 1))
            if not a["skipped"]:
                assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), (name, a, b)
    record_property(
        "observed",
        f"non-finite gradient on one rank at iteration {BAD_ITER} (1 rank, DP2, TP2, CP2): "
        f"update skipped on every rank, weights and Adam state bitwise unchanged; loss "
        f"curves within {worst:.0e} of one rank's",
    )


def _poisoned_weight_main(rank, world, argv, bad_rank, at):
    """main(argv) where rank `bad_rank` alone finds an inf in a weight after the update of iteration `at`."""
    real_step = loop.train_step
    done = {"steps": 0}

    def step(model, optimizer, *args):
        result = real_step(model, optimizer, *args)
        done["steps"] += 1
        if rank == bad_rank and done["steps"] == at:
            with torch.no_grad():
                local(model.final_norm.weight)[0] = math.inf
        return result

    loop.train_step = step
    main(argv)


def test_checkpoint_with_nonfinite_values_is_refused_on_every_rank(tmp_path, corpus, record_property):
    ck = tmp_path / "ck"
    spawn = tmp_path / "spawn"
    argv = TINY + corpus + FLAGS + ["--save", str(ck), "--save-interval", "2", "--log-dir", str(tmp_path / "log")]
    with pytest.raises(AssertionError, match="refusing to save the checkpoint of iteration 4"):
        run_ranks(_poisoned_weight_main, 2, spawn, argv, 1, 4)
    errors = [(spawn / f"rank{r}.err").read_text() for r in range(2)]
    for r, text in enumerate(errors):  # both ranks refused together, none hung in the save
        assert f"refusing to save the checkpoint of iteration 4 to {ck}: rank(s) [1] hold non-finite" in text, r
    assert "(this rank: model/final_norm.weight)" in errors[1] and "this rank" not in errors[0]
    assert checkpoint.read_latest(str(ck)) == "iter_0000002"
    assert not [n for n in os.listdir(ck) if "0000004" in n]  # not even a partial save
    record_property(
        "observed", "inf in one rank's weights: both ranks refused the save of iteration 4; latest still iter_0000002"
    )


def test_absurd_lr_stops_after_max_skipped_steps_naming_the_iteration(tmp_path, corpus, record_property):
    ck = tmp_path / "ck"
    argv = [*corpus, *FLAGS, "--train-iters", "10", "--lr", "1e30", "--max-skipped-steps", "3"]
    proc = run_pretrain(tmp_path, 2, argv + ["--save", str(ck), "--save-interval", "1"])
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-3000:]
    # lr 1e30: the first update leaves huge but finite weights, whose loss overflows from then on.
    assert (
        "stopping at iteration 4: the updates of iterations 2-4 were all skipped for a non-finite loss or "
        "gradient (--max-skipped-steps 3)"
    ) in text, text[-3000:]
    assert "this update skipped: non-finite loss or gradient" in text
    records = losses(ck)
    assert [r["skipped"] for r in records] == [False, True, True, True]
    assert [r["skipped_iterations"] for r in records] == [0, 1, 2, 3]
    assert checkpoint.read_latest(str(ck)) == "iter_0000003"  # iteration 4 stopped before its save
    for it in (1, 2, 3):  # every checkpoint written holds finite values only
        d = ck / f"iter_{it:07d}"
        tensors = {
            (name, key): t
            for name in os.listdir(d)
            if name.endswith(".pt")
            for key, t in torch.load(d / name, weights_only=False)["tensors"].items()
        }
        assert len(tensors) > 10 and all(torch.isfinite(t).all() for t in tensors.values()), d
    record_property(
        "observed",
        f"--lr 1e30 under torchrun: iterations 2-4 skipped, exit {proc.returncode} with "
        "'stopping at iteration 4 ...'; checkpoints 1-3 finite",
    )


def test_max_skipped_steps_zero_never_stops(tmp_path, corpus):
    records = train(
        tmp_path, "run", 1, corpus + FLAGS + ["--train-iters", "4", "--lr", "1e30", "--max-skipped-steps", "0"]
    )
    assert [r["skipped"] for r in records] == [False, True, True, True]
    assert [r["skipped_iterations"] for r in records] == [0, 1, 2, 3]
