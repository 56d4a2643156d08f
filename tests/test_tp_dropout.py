"""Attention dropout under TP: masks differ across TP ranks, and recompute replays them exactly."""

import torch
import torch.distributed as dist
from multiproc import run_ranks

from megalite.config import ModelConfig
from megalite.model import GPT
from megalite.parallel.apply_tp import apply_tp


def _model(recompute):
    cfg = ModelConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        seq_length=16,
        attention_dropout=0.5,
        recompute_granularity=recompute,
    )
    return apply_tp(GPT(cfg, 128, seed=3), dist.group.WORLD, sequence_parallel=False)


def _check(rank, world):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 128, (2, 17), generator=g)
    x, y, pos = tokens[:, :-1], tokens[:, 1:], torch.arange(16).expand(2, 16)
    docs = torch.tensor([0] * 5 + [1] * 9 + [2] * 2).expand(2, 16)  # packed documents take the same path
    for ids in (None, docs):
        grads = {}
        for recompute in (None, "selective", "full"):
            torch.manual_seed(11)  # the replicated stream, equal on both TP ranks
            model = _model(recompute)
            model(x, pos, y, ids).mean().backward()
            grads[recompute] = [p.grad.clone() for p in model.parameters()]
        for mode in ("selective", "full"):
            for a, b in zip(grads[None], grads[mode]):
                torch.testing.assert_close(b, a)
    # same q/k/v on every rank: outputs must differ, i.e. each rank draws its own masks
    core = model.layers[0].attention.core_attention
    q = torch.ones(1, 8, 2, 16)
    out = core(q, q, q)
    both = [torch.empty_like(out) for _ in range(world)]
    dist.all_gather(both, out)
    assert not torch.equal(both[0], both[1])


def test_attention_dropout_per_tp_rank(tmp_path):
    run_ranks(_check, 2, tmp_path)
