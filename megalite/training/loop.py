"""The training loop: micro-batching, loss normalisation, clipping, eval, logging, checkpoints.

Global batch t covers samples [t*G, (t+1)*G) of the shuffled training set whatever the layout:
micro step m of DP rank d takes samples m*(mb*DP) + d*mb + [0, mb). CP ranks of one DP rank
take the zigzag slice of the same sequences (the hierarchical one under a2a+p2p). The loss of
a global batch is the sum of per-token losses over all its loss tokens divided by their
number, so every layout computes the same quantity, and gradients are summed over DP x CP.
"""

from __future__ import annotations

import contextlib
import signal
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from ..config import Config
from ..generate import eval_sample
from ..parallel.data_parallel import finish_grads, grad_sync, reshard
from ..parallel.dims import ParallelDims
from ..parallel.zigzag import zigzag_split
from . import checkpoint
from .metrics import MetricsLogger, memory_gib
from .nonfinite import NonFiniteError, check_skips, save_refusal, step_flags
from .optim import clip_grad_norm, lr_at, set_lr
from .prefetch import Prefetcher


@dataclass(frozen=True)
class TrainSetup:
    """What train() works on, built by main() before the first step."""

    model: torch.nn.Module  # in its parallel form (TP/CP modules, FSDP2 over DP x CP)
    optimizer: torch.optim.Optimizer
    train_set: Dataset
    valid_set: Dataset | None  # None: evaluation off
    dims: ParallelDims
    cfg: Config
    device: torch.device
    flops_per_token: float  # model FLOPs of one training token, forward + backward, causal (for MFU)
    flops_per_token_full_attn: float  # the same over the full attention square (other systems' convention)
    tokenizer: object = None  # megalite.data.tokenizer.Tokenizer, for --eval-sample-prompt


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    exit_requested: bool = field(default=False, repr=False)
    skipped_iterations: int = 0  # updates skipped for a non-finite loss or gradient, this process
    consecutive_skips: int = 0


@dataclass
class StepResult:
    loss: float
    grad_norm: float  # as this rank computed it
    skipped: bool  # no rank applied the update: some rank saw a non-finite loss or gradient
    exiting: bool  # some rank received the exit signal


def micro_batches(dataset, start: int, cfg, dims, device):
    """This rank's micro-batches of the global batch that begins at sample `start`."""
    mb, dp = cfg.train.micro_batch_size, dims.dp
    n_micro = cfg.train.global_batch_size // (mb * dp)
    for m in range(n_micro):
        first = start + m * mb * dp + dims.dp_rank * mb
        samples = [dataset[i] for i in range(first, first + mb)]
        batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}  # each [mb, s]
        if dims.cp > 1:
            batch = {k: zigzag_split(v, 1, dims.cp, dims.cp_rank, dims.cp_a2a) for k, v in batch.items()}
        if torch.device(device).type == "cuda":  # pinned: the copy below is then truly asynchronous
            batch = {k: v.pin_memory() for k, v in batch.items()}
        yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@contextlib.contextmanager
def blame(op: str, dims, cfg):
    """Re-raise a failure inside ``op`` naming this rank and the operation: gloo's timeout says
    only "Timed out waiting 600000ms for recv operation to complete", naming neither."""
    try:
        yield
    except RuntimeError as exc:
        hint = ""
        if "timed out" in str(exc).lower() or "timeout" in str(exc).lower():
            hint = (
                f" (a peer did not join within --distributed-timeout-minutes "
                f"{cfg.parallel.distributed_timeout_minutes}: it is stuck, dead or much slower; see its log)"
            )
        raise RuntimeError(
            f"rank {dims.rank} (dp {dims.dp_rank}, cp {dims.cp_rank}, tp {dims.tp_rank}): {op} failed{hint}: {exc}"
        ) from exc


def _forward_loss(model, batch, global_tokens):
    # the masked loss sum in fp32, also under --bf16; the output layer + loss run tiled over
    # tokens (--loss-chunk-size)
    loss_sum = model(
        batch["tokens"], batch["position_ids"], batch["labels"], batch.get("document_ids"), loss_mask=batch["loss_mask"]
    )
    return loss_sum / global_tokens


def _global_tokens(batches, dims, device):
    local = sum(b["loss_mask"].sum() for b in batches).to(device=device, dtype=torch.float32)
    dist.all_reduce(local, group=dims.dp_cp_group)
    if local.item() == 0:
        raise RuntimeError("a global batch has no loss tokens (loss_mask is all zero)")
    return local


def train_step(model, optimizer, batches, dims, cfg, device, exit_requested: bool = False) -> StepResult:
    """One optimizer step over this rank's micro-batches, skipped on every rank when any rank's
    loss or gradient is not finite; the same world all-reduce shares the exit-signal flag."""
    with blame("loss-token count all-reduce (DP x CP)", dims, cfg):
        global_tokens = _global_tokens(batches, dims, device)
    loss_sum = torch.zeros((), device=device)
    for m, batch in enumerate(batches):
        last = m == len(batches) - 1
        grad_sync(model, cfg, last)
        with blame(f"forward/backward of micro-batch {m} (TP/CP exchanges, DP x CP gradient reduction)", dims, cfg):
            loss = _forward_loss(model, batch, global_tokens)
            loss.backward()
        loss_sum += loss.detach()
    with blame("sequence-parallel gradient all-reduce (TP)", dims, cfg):
        finish_grads(model, dims.tp_group)
    with blame("loss all-reduce (DP x CP)", dims, cfg):
        dist.all_reduce(loss_sum, group=dims.dp_cp_group)
    with blame("grad-norm all-reduce (DP x CP, TP)", dims, cfg):
        grad_norm = clip_grad_norm(model.parameters(), cfg.train.clip_grad, dims.tp_group, dims.dp_cp_group)
    with blame("non-finite and exit-signal flags all-reduce (world)", dims, cfg):
        skipped, exiting = step_flags(loss_sum, grad_norm, exit_requested)
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_sum.item(), grad_norm.item(), skipped, exiting)


@torch.no_grad()
def evaluate(model, dataset, dims, cfg, device) -> float:
    """Mean loss over the first --eval-iters global batches of `dataset`: the same samples at every
    evaluation, so successive values compare (Megatron-LM walks on through the set instead)."""
    model.eval()
    num = torch.zeros((), device=device)
    den = torch.zeros((), device=device)
    for e in range(cfg.train.eval_iters):
        for batch in micro_batches(dataset, e * cfg.train.global_batch_size, cfg, dims, device):
            num += _forward_loss(model, batch, 1.0)
            den += batch["loss_mask"].sum()
    model.train()
    reshard(model)
    both = torch.stack([num, den])
    dist.all_reduce(both, group=dims.dp_cp_group)
    return (both[0] / both[1]).item()


def _install_exit_handler(state: TrainState):
    def handler(signum, frame):
        state.exit_requested = True

    signal.signal(signal.SIGTERM, handler)


def train(setup: TrainSetup, state: TrainState, logger: MetricsLogger | None) -> TrainState:
    """Run until --train-iters (or --exit-interval / SIGTERM); saves per --save-interval and at the end.
    Only the logging rank passes a logger."""
    model, optimizer, dims, cfg, device = setup.model, setup.optimizer, setup.dims, setup.cfg, setup.device
    train_set, valid_set = setup.train_set, setup.valid_set
    t, ck = cfg.train, cfg.checkpoint
    tokens_per_step = t.global_batch_size * cfg.model.seq_length
    flops_step = setup.flops_per_token * tokens_per_step
    flops_step_full_attn = setup.flops_per_token_full_attn * tokens_per_step
    peak = logger.peak if logger else None
    if ck.exit_signal_handler:
        _install_exit_handler(state)
    model.train()
    start_iter, t_start = state.iteration, time.perf_counter()
    stop_at = min(t.train_iters, t.exit_interval or t.train_iters)
    loader = Prefetcher(
        lambda start: list(micro_batches(train_set, start, cfg, dims, device)),
        t.global_batch_size,
        device,
        enabled=cfg.data.data_prefetch,
    )
    while state.iteration < stop_at:
        t0 = time.perf_counter()
        lr = lr_at(state.iteration + 1, t)
        set_lr(optimizer, lr)
        waited = loader.wait_s
        batches = loader.get(state.consumed_samples)
        data_wait = loader.wait_s - waited
        step = train_step(model, optimizer, batches, dims, cfg, device, state.exit_requested)
        state.iteration += 1
        state.consumed_samples += t.global_batch_size
        state.skipped_iterations += step.skipped
        state.consecutive_skips = state.consecutive_skips + 1 if step.skipped else 0
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_time = time.perf_counter() - t0
        record = None
        if logger:
            elapsed = time.perf_counter() - t_start
            per_device = step_time * dims.world_size * 1e12
            tflops = flops_step / per_device
            record = {
                "iteration": state.iteration,
                "train_iters": t.train_iters,
                "consumed_samples": state.consumed_samples,
                "loss": step.loss,
                "lr": lr,
                "grad_norm": step.grad_norm,
                "skipped": step.skipped,
                "skipped_iterations": state.skipped_iterations,
                "tokens_per_sec": tokens_per_step / step_time,
                "step_time": step_time,
                "data_wait_s": data_wait,  # of step_time, spent waiting for this step's batches
                "tflops_per_device": tflops,
                "tflops_per_device_full_attn": flops_step_full_attn / per_device,
                "mfu": tflops / peak if peak else None,
                "mem_gib": memory_gib(device),
                "eta_s": elapsed / (state.iteration - start_iter) * (stop_at - state.iteration),
            }
        if (
            valid_set is not None
            and t.eval_interval
            and (state.iteration % t.eval_interval == 0 or state.iteration == t.train_iters)
        ):
            with blame("evaluation", dims, cfg):
                valid = evaluate(model, valid_set, dims, cfg, device)
            if record:
                record["valid_loss"] = valid
        if (
            t.eval_sample_prompt
            and t.eval_interval
            and (state.iteration % t.eval_interval == 0 or state.iteration == t.train_iters)
        ):
            with blame("--eval-sample-prompt generation (TP logits all-gather)", dims, cfg):
                text = eval_sample(model, setup.tokenizer, t.eval_sample_prompt, dims, t.bf16)
                reshard(model)
            if record:
                record["sample"] = text
                print(f"megalite: sample at iteration {state.iteration}: {t.eval_sample_prompt + text!r}", flush=True)
        if logger:
            logger.log(
                record, line=state.iteration % logger.interval == 0 or state.iteration == stop_at or step.skipped
            )
        check_skips(state.iteration, state.consecutive_skips, t.max_skipped_steps)
        periodic = ck.save_interval and state.iteration % ck.save_interval == 0
        if ck.save and (periodic or step.exiting or state.iteration == stop_at):
            with blame("non-finite check before the checkpoint save (world)", dims, cfg):
                refusal = save_refusal(model, optimizer, dims, state.iteration, ck.save, device)
            if refusal:
                raise NonFiniteError(refusal)
            with blame("checkpoint save", dims, cfg):
                checkpoint.save(ck.save, state.iteration, state.consumed_samples, model, optimizer, dims, cfg)
        if step.exiting:
            if logger:
                print(
                    f"megalite: exit signal received: stopping after iteration {state.iteration}"
                    + (f", checkpoint saved in {ck.save}" if ck.save else " (no --save: nothing saved)"),
                    flush=True,
                )
            break
    loader.close()
    return state
