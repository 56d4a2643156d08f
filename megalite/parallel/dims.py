"""The DP x CP x TP process grid, built once and passed down.

Global rank r sits at (dp, cp, tp) with TP innermost: r = (dp * CP + cp) * TP + tp, so a TP
group is a run of consecutive ranks (one node's NVLink domain) and CP neighbours are TP
apart. ``dp_cp`` is the flattened DP x CP group over which replicated parameters' gradients
are summed. Every group is a real ProcessGroup (a size-1 group works as the identity).

Under --cp-comm-type a2a+p2p with --hierarchical-context-parallel-sizes A P, CP rank c = p*A + a:
``cp_a2a_group`` holds the A consecutive CP ranks of group p (one node when TP*A ranks fit on
it), ``cp_ring_group`` the P ranks with the same a, one per group.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from ..config import ConfigError, ParallelConfig


def check_layout(world_size: int, tp: int, cp: int) -> int:
    """Return the DP size, or raise naming the sizes that do not divide."""
    if tp < 1 or cp < 1:
        raise ConfigError(f"--tensor-parallel-size ({tp}) and --context-parallel-size ({cp}) must be >= 1")
    if world_size % (tp * cp):
        raise ConfigError(
            f"world size {world_size} is not divisible by tensor-parallel-size {tp} x "
            f"context-parallel-size {cp} = {tp * cp}; launch a multiple of {tp * cp} ranks "
            f"or change the sizes"
        )
    return world_size // (tp * cp)


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
    rank: int
    dp: int
    cp: int
    tp: int
    tp_group: dist.ProcessGroup  # consecutive ranks
    cp_group: dist.ProcessGroup  # ranks TP apart, same DP index
    dp_cp_group: dist.ProcessGroup  # DP x CP flattened: the ranks that share this rank's TP index
    sequence_parallel: bool = False
    cp_a2a: int = 1  # A of hierarchical CP (1: flat CP)
    cp_a2a_group: dist.ProcessGroup | None = None  # hierarchical CP only
    cp_ring_group: dist.ProcessGroup | None = None

    @staticmethod
    def build(cfg: ParallelConfig) -> ParallelDims:
        """Build the grid over the already-initialised default process group.

        Plain groups from the public API, each bounded by --distributed-timeout-minutes (groups
        made without a timeout get torch's default, 10 or 30 minutes, whatever the user asked).
        Every rank creates every subgroup, in the same order; the backend is the default group's."""
        world, rank = dist.get_world_size(), dist.get_rank()
        tp, cp = cfg.tensor_parallel_size, cfg.context_parallel_size
        dp = check_layout(world, tp, cp)
        timeout = timedelta(minutes=cfg.distributed_timeout_minutes)

        def group(enumeration):
            return dist.new_subgroups_by_enumeration(enumeration, timeout=timeout)[0]

        tp_group = group([list(range(s, s + tp)) for s in range(0, world, tp)])
        cp_group = group([[(d * cp + c) * tp + t for c in range(cp)] for d in range(dp) for t in range(tp)])
        dp_cp_group = group([list(range(t, world, tp)) for t in range(tp)])
        hier = {}
        if cfg.cp_comm_type == "a2a+p2p":
            a, p = cfg.hierarchical_context_parallel_sizes

            def rank_of(d, t, c):
                return (d * cp + c) * tp + t

            runs = [(d, t) for d in range(dp) for t in range(tp)]
            a2a = group([[rank_of(d, t, q * a + i) for i in range(a)] for d, t in runs for q in range(p)])
            ring = group([[rank_of(d, t, q * a + i) for q in range(p)] for d, t in runs for i in range(a)])
            hier = dict(cp_a2a=a, cp_a2a_group=a2a, cp_ring_group=ring)
        sp = cfg.sequence_parallel and tp > 1
        return ParallelDims(world, rank, dp, cp, tp, tp_group, cp_group, dp_cp_group, sp, **hier)

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def cp_rank(self) -> int:
        return (self.rank // self.tp) % self.cp

    @property
    def dp_rank(self) -> int:
        return self.rank // (self.tp * self.cp)

    @property
    def is_logger(self) -> bool:
        """Exactly one rank logs metrics."""
        return self.rank == 0

    def dropout_seed(self, base: int) -> int:
        """Seed of this rank's dropout stream. Ranks that hold different tokens (CP shards, SP
        shards) draw different masks; TP ranks without SP must agree, as their hidden
        activations are replicas (Megatron's rule)."""
        return base + 1009 * self.cp_rank + (101 * self.tp_rank if self.sequence_parallel else 0)

    def describe(self) -> str:
        hier = f" (a2a {self.cp_a2a} x ring {self.cp // self.cp_a2a})" if self.cp_ring_group is not None else ""
        return f"world {self.world_size} = DP {self.dp} x CP {self.cp}{hier} x TP {self.tp}" + (
            " (+SP)" if self.sequence_parallel else ""
        )
