"""Non-finite guards: an update whose loss or gradient is not finite on any rank is skipped on
every rank, and a checkpoint holding a non-finite value is never written.

One world all-reduce (MAX) per step carries two flags, "some rank saw a non-finite loss or
gradient norm" and "some rank received the exit signal", so every rank takes the same decision
and the guard costs no extra round trip. A rank's gradient norm covers its TP-sharded gradients
(summed over TP) and its own replicated ones, so a bad value on any rank raises the flag. A
skipped update leaves weights and optimizer state (Adam's moments and step count) untouched;
the iteration, the data position and the LR schedule still advance, as in Megatron-LM.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..parallel.data_parallel import local


class NonFiniteError(RuntimeError):
    """Training cannot go on, or a checkpoint cannot be written, because values are not finite."""


def step_flags(loss: torch.Tensor, grad_norm: torch.Tensor, exit_requested: bool) -> tuple[bool, bool]:
    """(skip this update, stop after this step): the same answer on every rank."""
    bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm.to(loss.device)))
    flags = torch.stack([bad.float(), torch.tensor(float(exit_requested), device=loss.device)])
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=dist.group.WORLD)
    skip, stop = flags.tolist()
    return skip > 0, stop > 0


def check_skips(iteration: int, consecutive: int, max_skipped: int) -> None:
    """Raise once ``max_skipped`` updates in a row were skipped (0: never)."""
    if not max_skipped or consecutive < max_skipped:
        return
    first = iteration - consecutive + 1
    raise NonFiniteError(
        f"stopping at iteration {iteration}: the updates of iterations {first}-{iteration} were all skipped for a "
        f"non-finite loss or gradient (--max-skipped-steps {max_skipped}); weights and optimizer state are still "
        f"those after iteration {first - 1}. Lower --lr or lengthen --lr-warmup-iters, check the data, and "
        f"resume from the last checkpoint with --load"
    )


def first_nonfinite(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> str | None:
    """Name of the first parameter or optimizer state tensor holding a NaN or inf, else None."""
    names = {p: n for n, p in model.named_parameters()}
    tensors = [(f"model/{n}", local(p.detach())) for p, n in names.items()]  # this rank's pieces
    tensors += [
        (f"optim/{names[p]}/{k}", local(v))
        for p, state in optimizer.state.items()
        for k, v in state.items()
        if torch.is_tensor(v)
    ]
    finite = torch.stack([torch.isfinite(t).all() for _, t in tensors]).cpu()  # one device sync
    return None if finite.all() else tensors[int((~finite).nonzero()[0])][0]


def save_refusal(model, optimizer, dims, iteration: int, save_dir: str, device) -> str | None:
    """Collective over the world: why no rank may save (some rank holds a non-finite value), else None."""
    bad = first_nonfinite(model, optimizer)
    flags = torch.zeros(dims.world_size, device=device)
    flags[dims.rank] = float(bad is not None)
    dist.all_reduce(flags, group=dist.group.WORLD)
    ranks = flags.nonzero().flatten().tolist()
    if not ranks:
        return None
    return (
        f"refusing to save the checkpoint of iteration {iteration} to {save_dir}: rank(s) {ranks} hold "
        f"non-finite values" + (f" (this rank: {bad})" if bad else "") + f"; nothing was written, the "
        f"checkpoints already in {save_dir} are untouched"
    )
