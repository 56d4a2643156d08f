import os
import time

import pytest
import torch
import torch.distributed as dist
from multiproc import run_ranks

from megalite.config import ConfigError, ParallelConfig
from megalite.parallel.dims import ParallelDims, check_layout


def test_layout_must_divide():
    assert check_layout(8, 2, 2) == 2
    with pytest.raises(ConfigError, match="not divisible by tensor-parallel-size 2 x context-parallel-size 2"):
        check_layout(6, 2, 2)


def _grid(rank, world):
    dims = ParallelDims.build(ParallelConfig(tensor_parallel_size=2, context_parallel_size=2))
    assert (dims.dp, dims.cp, dims.tp) == (1, 2, 2)
    assert rank == (dims.dp_rank * 2 + dims.cp_rank) * 2 + dims.tp_rank
    # TP innermost: TP peers are consecutive ranks, CP peers are TP apart.
    assert dist.get_process_group_ranks(dims.tp_group) == [rank - rank % 2, rank - rank % 2 + 1]
    assert dist.get_process_group_ranks(dims.cp_group) == [rank % 2, rank % 2 + 2]
    assert sorted(dist.get_process_group_ranks(dims.dp_cp_group)) == [rank % 2, rank % 2 + 2]
    assert dist.get_rank(dims.tp_group) == dims.tp_rank and dist.get_rank(dims.cp_group) == dims.cp_rank
    # DP x CP spans DP too: TP=2 x DP=2, and CP=2 x DP=2 (one group of all four ranks).
    dp2 = ParallelDims.build(ParallelConfig(tensor_parallel_size=2))
    assert (dp2.dp, dp2.dp_rank) == (2, rank // 2)
    assert dist.get_process_group_ranks(dp2.dp_cp_group) == [rank % 2, rank % 2 + 2]
    cp_dp = ParallelDims.build(ParallelConfig(context_parallel_size=2))
    assert (cp_dp.dp, cp_dp.cp, cp_dp.cp_rank) == (2, 2, rank % 2)
    assert dist.get_process_group_ranks(cp_dp.dp_cp_group) == [0, 1, 2, 3]
    # a2a+p2p, CP=4 as A=2 x P=2: CP rank c = p*A + a, all-to-all over consecutive CP ranks, ring across.
    hier = ParallelDims.build(
        ParallelConfig(context_parallel_size=4, cp_comm_type="a2a+p2p", hierarchical_context_parallel_sizes=[2, 2])
    )
    assert hier.cp_a2a == 2 and dims.cp_a2a_group is None
    assert dist.get_process_group_ranks(hier.cp_a2a_group) == [rank - rank % 2, rank - rank % 2 + 1]
    assert dist.get_process_group_ranks(hier.cp_ring_group) == [rank % 2, rank % 2 + 2]
    assert (dist.get_rank(hier.cp_ring_group), dist.get_rank(hier.cp_a2a_group)) == divmod(hier.cp_rank, 2)


def test_grid_ranks(tmp_path):
    run_ranks(_grid, 4, tmp_path)


def _timeouts(rank, world, flag):
    n = 0
    for cfg in (
        ParallelConfig(tensor_parallel_size=2, distributed_timeout_minutes=0.05),
        ParallelConfig(context_parallel_size=2, distributed_timeout_minutes=0.05),
    ):
        dims = ParallelDims.build(cfg)
        groups = [dims.tp_group] if dims.tp == 2 else [dims.cp_group, dims.dp_cp_group]
        for group in groups:
            n += 1
            done = f"{flag}.{n}"
            if rank == 0:  # rank 1 never joins: only the group's own timeout can end this
                with pytest.raises(RuntimeError, match="(?i)timed out"):
                    dist.all_reduce(torch.ones(1), group=group)
                open(done, "w").close()
            else:
                deadline = time.time() + 240
                while not os.path.exists(done) and time.time() < deadline:
                    time.sleep(0.05)
                assert os.path.exists(done), "rank 0 was not released by --distributed-timeout-minutes"
            dist.barrier()


def test_every_group_honours_the_distributed_timeout(tmp_path):
    """Groups made without an explicit timeout wait torch's default (10-30 min) instead of the user's."""
    run_ranks(_timeouts, 2, tmp_path / "spawn", str(tmp_path / "done"))
