"""AdamW with decoupled weight decay, the LR schedule and layout-aware gradient clipping."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ..config import TrainConfig
from ..parallel.data_parallel import is_dp_sharded, local
from ..parallel.tensor_parallel import split_dim


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """Weights decay; biases and norm gains (1-D parameters) do not, as in Megatron."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # foreach=False keeps results independent of how parameters are batched across layouts.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, foreach=False)


def lr_at(iteration: int, cfg: TrainConfig) -> float:
    """LR for the step that produces `iteration` (1-based): linear warmup, then decay to min_lr.

    The step that produces iteration k runs at schedule(k), so the first warmup step already
    has lr / warmup (Megatron-LM applies schedule(k - 1) and starts at 0). ``validate`` refuses
    a decay horizon that does not exceed the warmup."""
    warm = cfg.lr_warmup_iters
    if warm and iteration <= warm:
        return cfg.lr * iteration / warm
    horizon = cfg.lr_decay_iters or cfg.train_iters
    if cfg.lr_decay_style == "constant":
        return cfg.lr
    frac = min(1.0, (iteration - warm) / (horizon - warm))
    if cfg.lr_decay_style == "linear":
        coeff = 1.0 - frac
    else:
        coeff = 0.5 * (1.0 + math.cos(math.pi * frac))
    return cfg.min_lr + coeff * (cfg.lr - cfg.min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


def clip_grad_norm(params, max_norm: float, tp_group, dp_cp_group) -> torch.Tensor:
    """Global L2 norm of all gradients, clipping in place when max_norm > 0.

    Each gradient is counted once: squares of pieces split over DP x CP (FSDP2 shards) are
    summed over DP x CP, then those of parameters with a ``tp_split_dim`` over TP; replicated
    copies (DP x CP replicas hold identical summed gradients, TP replicas too) count once.
    """
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    dev = grads[0].grad.device
    sq = torch.zeros(2, 2, device=dev, dtype=torch.float32)  # [split over DP x CP?, split over TP?]
    for p in grads:
        sq[int(is_dp_sharded(p)), int(split_dim(p) is not None)] += local(p.grad).detach().float().pow(2).sum()
    if dist.get_world_size(dp_cp_group) > 1 and any(map(is_dp_sharded, grads)):
        dist.all_reduce(sq[1], group=dp_cp_group)
    per_tp = sq.sum(dim=0)  # [replicated over TP, split over TP]
    if dist.get_world_size(tp_group) > 1:
        dist.all_reduce(per_tp[1:], group=tp_group)
    total = per_tp.sum().sqrt()
    if max_norm > 0:
        coeff = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for p in grads:
            local(p.grad).detach().mul_(coeff.to(p.grad.dtype))
    return total
