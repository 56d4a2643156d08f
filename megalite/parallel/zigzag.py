"""Zigzag sharding of sequences for context parallelism.

Each sequence is cut into 2*CP equal chunks; CP rank r keeps chunks r and 2*CP-1-r, concatenated.
Under a causal mask an early chunk has little to attend to and a late one a lot, so pairing the
r-th earliest with the r-th latest gives every rank the same attention work.

The data path applies the same ``zigzag_split`` to tokens, labels (shifted by one BEFORE the
split, so each label stays next to its token), the loss mask and the position ids: RoPE and
learned absolute positions then see each token's true position.

Hierarchical CP (``--cp-comm-type a2a+p2p``, ``inner`` = A ranks per all-to-all group, P =
CP/A groups): the zigzag runs over the P groups (2P chunks; group p owns chunks p and 2P-1-p)
and each of the group's two chunks is cut into A contiguous pieces; CP rank p*A + a keeps piece
a of both. The all-to-all inside the group gathers the A pieces back, so every rank then holds
group p's plain zigzag pair (for H/A heads): exactly what the ring over the P groups expects.
The pieces are 2*CP per sequence, as in the flat zigzag, so the divisibility rule is the same.
``inner`` = 1 is the flat zigzag.
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


def _check_inner(cp_size: int, inner: int) -> None:
    if inner < 1 or cp_size % inner:
        raise ValueError(f"inner all-to-all size {inner} does not divide the context-parallel size {cp_size}")


def zigzag_split(x: torch.Tensor, dim: int, cp_size: int, cp_rank: int, inner: int = 1) -> torch.Tensor:
    """This rank's zigzag pair: chunks cp_rank and 2*cp_size-1-cp_rank of 2*cp_size along ``dim``,
    concatenated (a new tensor; the identity for cp_size == 1). With ``inner`` = A > 1 the
    hierarchical layout of the module docstring: piece cp_rank % A of both chunks of the pair
    of group cp_rank // A."""
    if cp_size == 1:
        return x
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} is outside [0, {cp_size})")
    _check_inner(cp_size, inner)
    _check(x.shape[dim], cp_size, dim)
    outer, (p, a) = cp_size // inner, divmod(cp_rank, inner)
    chunks = x.chunk(2 * outer, dim=dim)
    return torch.cat([chunks[p].chunk(inner, dim=dim)[a], chunks[2 * outer - 1 - p].chunk(inner, dim=dim)[a]], dim=dim)


def zigzag_merge(
    gathered: torch.Tensor | Sequence[torch.Tensor], dim: int, cp_size: int | None = None, inner: int = 1
) -> torch.Tensor:
    """Inverse of ``zigzag_split`` (same ``inner``): every rank's pair back to natural order along ``dim``.

    ``gathered`` is either the list of the cp_size ranks' pieces (rank order), or one tensor
    holding them concatenated along ``dim`` in rank order (then pass ``cp_size``)."""
    if isinstance(gathered, torch.Tensor):
        if cp_size is None:
            raise ValueError("zigzag_merge of a concatenated tensor needs cp_size")
        _check(gathered.shape[dim], cp_size, dim)
        gathered = gathered.chunk(cp_size, dim=dim)
    elif cp_size is not None and cp_size != len(gathered):
        raise ValueError(f"zigzag_merge got {len(gathered)} pieces but cp_size {cp_size}")
    _check_inner(len(gathered), inner)
    halves = [piece.chunk(2, dim=dim) for piece in gathered]
    # Each group's A ranks: first halves side by side make chunk p, second halves chunk 2P-1-p.
    pairs = [halves[i : i + inner] for i in range(0, len(halves), inner)]
    pairs = [(torch.cat([h[0] for h in g], dim=dim), torch.cat([h[1] for h in g], dim=dim)) for g in pairs]
    # Group p's first chunk is chunk p, its second chunk 2P-1-p.
    return torch.cat([h[0] for h in pairs] + [h[1] for h in reversed(pairs)], dim=dim)


def zigzag_positions(seq_len: int, cp_size: int, cp_rank: int, device=None, inner: int = 1) -> torch.Tensor:
    """Natural positions of this rank's tokens (shape [seq_len / cp_size], int64)."""
    return zigzag_split(torch.arange(seq_len, device=device), 0, cp_size, cp_rank, inner)


def zigzag_pieces(local_len: int, cp_size: int, cp_rank: int) -> list[tuple[int, int, int]]:
    """This rank's local sequence as (local start, local stop, global start) of each chunk it
    holds: chunks cp_rank and 2*cp_size-1-cp_rank (the whole sequence for cp_size 1)."""
    if cp_size == 1:
        return [(0, local_len, 0)]
    c = local_len // 2
    return [(0, c, cp_rank * c), (c, 2 * c, (2 * cp_size - 1 - cp_rank) * c)]
