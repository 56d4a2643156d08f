"""Blended datasets: per-batch shares, purity, layouts, resume mid-blend, flags."""

import os
import sysconfig
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pretrain_utils import train
from test_data import tiny_docs, write

from megalite.config import ConfigError, parse
from megalite.data.blend import QUANTUM, BlendedDataset, build_blends, parse_blend
from megalite.data.preprocess import preprocess
from megalite.parallel.zigzag import zigzag_merge
from megalite.training.loop import micro_batches


class Source:
    """Stands in for a GPTDataset: sample k of source s is {"s": s, "k": k}."""

    def __init__(self, s, n):
        self.s, self.n = s, n

    def __len__(self):
        return self.n

    def __getitem__(self, k):
        return {"s": self.s, "k": k}


@pytest.mark.parametrize(
    "weights, batch",
    [([0.7, 0.3], 10), ([1 / 3, 2 / 3], 7), ([0.5, 0.2, 0.2, 0.1, 0.0], 16), ([0.05, 0.15, 0.3, 0.5], 3)],
)
def test_every_global_batch_tracks_the_weights(weights, batch):
    blend = BlendedDataset([Source(s, 5) for s in range(len(weights))], weights, batch)
    n_batches = min(blend.period * 2 + 3, 3000)  # past the plan's period, so the wrap is covered
    got = [blend[i] for i in range(n_batches * batch)]
    src = np.array([g["s"] for g in got]).reshape(n_batches, batch)
    w = blend.weights  # the quantised weights, within 1/QUANTUM of the given ones
    assert np.abs(w - np.array(weights)).max() <= 1 / QUANTUM
    for s in range(len(weights)):
        per_batch = (src == s).sum(1)
        assert np.all(np.abs(per_batch - w[s] * batch) < 1), (s, per_batch)  # floor or ceil in every batch
        total = np.cumsum(per_batch)
        assert np.abs(total - w[s] * batch * np.arange(1, n_batches + 1)).max() < 1.1
        # each source serves its own samples 0, 1, 2, ... in order: none skipped or repeated
        assert [g["k"] for g in got if g["s"] == s] == list(range(int(total[-1])))


def test_sample_is_a_pure_function_of_index():
    sources = [Source(s, 3) for s in range(3)]
    ref = BlendedDataset(sources, [0.6, 0.3, 0.1], 9)
    fresh = BlendedDataset(sources, [6, 3, 1], 9)  # unnormalised weights mean the same
    for i in [10**7 + 5, 0, 12345, 9 * ref.period + 4, 1]:
        assert fresh[i] == ref[i]
    with pytest.raises(IndexError):
        ref[-1]


def test_parse_blend():
    assert parse_blend(["data/a"]) == [(1.0, "data/a")]
    assert parse_blend(["3", "a", "1", "b"]) == [(0.75, "a"), (0.25, "b")]
    for bad, match in [
        (["0.7", "a", "0.3"], "WEIGHT PREFIX pairs"),
        (["x", "a", "0.3", "b"], "'x' is not a weight"),
        (["-1", "a", "2", "b"], "must be a finite number >= 0"),
        (["0", "a", "0", "b"], "sum to 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            parse_blend(bad)


def test_data_flags_are_checked_at_parse(tmp_path):
    tok = ["--tokenizer-model", "t.model"]
    for argv, match in [
        (["--data-path", "0.5", "a", "b"] + tok, "WEIGHT PREFIX pairs"),
        (["--data-path", "a", "--train-data-path", "b"] + tok, "cannot be combined"),
        (["--valid-data-path", "b"] + tok, "needs --train-data-path"),
        (["--train-data-path", "b"] + tok, "add --valid-data-path, or --eval-iters 0"),
        (["--data-path", "0.5", "a", "0.5", "b"], "needs --tokenizer-model"),
    ]:
        with pytest.raises(ConfigError, match=match):
            parse(argv)
    cfg = tmp_path / "c.json"
    cfg.write_text('{"data-path": [0.7, "a", 0.3, "b"], "tokenizer-model": "t.model"}')
    assert parse(["--config", str(cfg)]).data.data_path == ["0.7", "a", "0.3", "b"]
    assert parse(["--train-data-path", "1", "a", "--eval-iters", "0"] + tok).data.train_data_path == ["1", "a"]


def test_blend_is_identical_under_any_layout(tmp_path):
    """Real datasets of different sizes (the small one wraps into later epochs): every layout's
    micro-batches, reassembled, are the 1-rank global batch."""
    a = write(tmp_path / "a", tiny_docs(200, seed=1))
    b = write(tmp_path / "b", tiny_docs(15, seed=2))
    flags = SimpleNamespace(data_path=["0.6", a, "0.4", b], train_data_path=None, valid_data_path=None, split="90,10,0")
    gbs, seq = 8, 16
    train_set, valid_set = build_blends(flags, None, seq, 3, 0, gbs)
    assert isinstance(train_set, BlendedDataset) and isinstance(valid_set, BlendedDataset)
    assert len(train_set.datasets[1]) * 3 < 12 * gbs * 0.4  # source b runs out: later epochs are used

    def global_batches(cp, dp, mb):
        """Each global batch as the ranks of (CP, DP) see it, put back together (TP ranks of
        a (dp, cp) pair run the same micro_batches call)."""
        cfg = SimpleNamespace(train=SimpleNamespace(micro_batch_size=mb, global_batch_size=gbs))
        out = []
        for start in range(0, 12 * gbs, gbs):
            per_rank = {
                (d, c): list(
                    micro_batches(
                        train_set, start, cfg, SimpleNamespace(dp=dp, dp_rank=d, cp=cp, cp_rank=c, cp_a2a=1), "cpu"
                    )
                )
                for d in range(dp)
                for c in range(cp)
            }
            n_micro = len(per_rank[0, 0])
            rows = [
                zigzag_merge([per_rank[d, c][m]["tokens"] for c in range(cp)], 1)
                for m in range(n_micro)
                for d in range(dp)
            ]
            out.append(torch.cat(rows))
        return torch.stack(out)

    ref = global_batches(1, 1, gbs)
    expect = torch.stack(
        [torch.stack([train_set[i]["tokens"] for i in range(s, s + gbs)]) for s in range(0, 12 * gbs, gbs)]
    )
    assert torch.equal(ref, expect)
    assert torch.equal(global_batches(2, 1, 2), ref)  # CP2 (x TP2: same calls)
    assert torch.equal(global_batches(1, 2, 2), ref)  # DP2


def test_resume_mid_blend_is_bitwise_and_a_changed_blend_warns(tmp_path, corpus, capfd):
    data, tok = corpus[1], corpus[3]
    other = tmp_path / "other.txt"
    other.write_text(open(os.path.join(sysconfig.get_paths()["stdlib"], "glob.py")).read())
    b = str(tmp_path / "b")
    preprocess([str(other)], tok, b, split_paragraphs=True, log=lambda *a: None)
    blend = ["--data-path", "0.7", data, "0.3", b, "--tokenizer-model", tok, "--global-batch-size", "4"]
    ck = str(tmp_path / "ck")
    full = train(tmp_path, "full", 1, blend + ["--train-iters", "4", "--save", ck, "--save-interval", "2"])
    capfd.readouterr()
    rest = train(tmp_path, "rest", 1, blend + ["--train-iters", "4", "--load", os.path.join(ck, "iter_0000002")])
    assert [r["loss"] for r in rest] == [r["loss"] for r in full[2:]]
    assert "data blend differs" not in capfd.readouterr().out
    changed = ["--data-path", "0.5", data, "0.5", b] + blend[5:]
    train(tmp_path, "changed", 1, changed + ["--train-iters", "3", "--load", os.path.join(ck, "iter_0000002")])
    assert "data blend differs from the checkpoint's" in capfd.readouterr().out
