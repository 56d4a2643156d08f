"""Sharded, reshardable, atomic checkpoints.

Layout of ``<save>/``::

    iter_0000100/
        rank_00000.pt   this rank's share of the tensors + its RNG streams (one file per rank)
        ...
        meta.json       iteration, consumed samples, layout, model config, tensor index,
                        each file's size and CRC-32
    latest              the name of the newest committed iteration directory
    .lock               held by the run saving here (pid and host; see lock.py)

Every tensor is keyed by NAME: ``model/<param>`` and ``optim/<param>/<state>`` (Adam's
``exp_avg`` / ``exp_avg_sq`` shard like their parameter; ``step`` is replicated). The index in
meta.json gives each tensor's full (dense-model) shape, the dim its TP shards split (None when
replicated), and the file holding each shard. Identical copies (DP x CP replicas, and
replicated tensors on every TP rank) are written once, by the replica with the fewest bytes so
far, so all ranks write in parallel. Under a sharded data-parallel strategy FSDP2 splits each
TP shard on dim 0 over DP x CP ("pieces" in the index): each rank writes the piece it holds.

Loading into another layout: each rank reads, for each of its parameters, the region its new
TP rank (and FSDP2 piece) owns, copying from whichever old shards overlap it (files are memory-mapped, so only
those bytes are read). Vocabulary tensors keep their ``vocab_size`` real rows; the padding,
which depends on TP, is re-created as zeros. LR schedule = f(iteration) and the data position
is ``consumed_samples``; both are layout independent. RNG: the same layout (TP, CP, DP)
restores every rank's streams exactly; another layout reseeds each rank from ``--seed +
iteration`` through ParallelDims.dropout_seed (per-rank streams have no meaning there; dropout
masks differ from an uninterrupted run, results are otherwise the same up to summation order).

Atomic save: ranks write into ``.tmp_iter_...``; after all have written, rank 0 writes
meta.json (with every file's size and checksum), renames the directory into place, and only
then replaces ``latest`` (temp file + rename). ``latest`` is the commit point: a crash anywhere
before it leaves the previous checkpoint as the one ``--load`` resumes from. Ranks agree on the
outcome of each phase (prepare, write, commit) before the next, so a failed write on one rank
(a full disk) is an error on all of them, never a hang.

Before use, a checkpoint's file sizes are checked on every rank (before any collective), then
its checksums by all ranks together (each reads a share); a bad newest checkpoint gives way to
the newest good one, with a warning naming the bad file.
"""

from __future__ import annotations

from .atomic_save import save
from .format import FORMAT, partition_dims
from .lock import lock_save_dir
from .reshard_load import load
from .resolve import (
    check_compatible,
    list_checkpoints,
    problem,
    read_latest,
    read_meta,
    resolve_load_dir,
    verify_load_dir,
)

__all__ = [
    "FORMAT",
    "check_compatible",
    "list_checkpoints",
    "load",
    "lock_save_dir",
    "partition_dims",
    "problem",
    "read_latest",
    "read_meta",
    "resolve_load_dir",
    "save",
    "verify_load_dir",
]
