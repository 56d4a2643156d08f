"""Zigzag sharding of sequences for context parallelism.

Each sequence is cut into 2*CP equal chunks; CP rank r keeps chunks r and 2*CP-1-r, concatenated.
Under a causal mask an early chunk has little to attend to and a late one a lot, so pairing the
r-th earliest with the r-th latest gives every rank the same attention work.

The data path applies the same ``zigzag_split`` to tokens, labels (shifted by one BEFORE the
split, so each label stays next to its token), the loss mask and the position ids: RoPE and
learned absolute positions then see each token's true position.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _check(length: int, cp_size: int, dim: int) -> None:
    if length % (2 * cp_size):
        raise ValueError(
            f"sequence dim {dim} has length {length}, not divisible by 2 x context-parallel size "
            f"{cp_size} = {2 * cp_size} (zigzag needs 2*CP equal chunks); pad or choose --seq-length "
            f"as a multiple of {2 * cp_size}"
        )


def zigzag_split(x: torch.Tensor, dim: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """This rank's zigzag pair: chunks cp_rank and 2*cp_size-1-cp_rank of 2*cp_size along ``dim``,
    concatenated (a new tensor; the identity for cp_size == 1)."""
    if cp_size == 1:
        return x
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} is outside [0, {cp_size})")
    _check(x.shape[dim], cp_size, dim)
    chunks = x.chunk(2 * cp_size, dim=dim)
    return torch.cat([chunks[cp_rank], chunks[2 * cp_size - 1 - cp_rank]], dim=dim)


def zigzag_merge(gathered: torch.Tensor | Sequence[torch.Tensor], dim: int, cp_size: int | None = None) -> torch.Tensor:
    """Inverse of ``zigzag_split``: every rank's pair back to natural order along ``dim``.

    ``gathered`` is either the list of the cp_size ranks' pieces (rank order), or one tensor
    holding them concatenated along ``dim`` in rank order (then pass ``cp_size``)."""
    if isinstance(gathered, torch.Tensor):
        if cp_size is None:
            raise ValueError("zigzag_merge of a concatenated tensor needs cp_size")
        _check(gathered.shape[dim], cp_size, dim)
        gathered = gathered.chunk(cp_size, dim=dim)
    elif cp_size is not None and cp_size != len(gathered):
        raise ValueError(f"zigzag_merge got {len(gathered)} pieces but cp_size {cp_size}")
    halves = [piece.chunk(2, dim=dim) for piece in gathered]
    # Rank r's first half is chunk r, its second half chunk 2*CP-1-r.
    return torch.cat([h[0] for h in halves] + [h[1] for h in reversed(halves)], dim=dim)


def zigzag_positions(seq_len: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """Natural positions of this rank's tokens (shape [seq_len / cp_size], int64)."""
    return zigzag_split(torch.arange(seq_len, device=device), 0, cp_size, cp_rank)


def zigzag_pieces(local_len: int, cp_size: int, cp_rank: int) -> list[tuple[int, int, int]]:
    """This rank's local sequence as (local start, local stop, global start) of each chunk it
    holds: chunks cp_rank and 2*cp_size-1-cp_rank (the whole sequence for cp_size 1)."""
    if cp_size == 1:
        return [(0, local_len, 0)]
    c = local_len // 2
    return [(0, c, cp_rank * c), (c, 2 * c, (2 * cp_size - 1 - cp_rank) * c)]
