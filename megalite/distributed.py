"""Process-group start-up: the only reader of RANK / LOCAL_RANK / WORLD_SIZE.

Under torchrun the env:// rendezvous is used; a plain `python pretrain.py` becomes a world of
one with an in-memory store, so single-rank runs take the same code path as many.
"""

from __future__ import annotations

import gc
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from .config import Config, ConfigError


def launch_env() -> tuple[int, int]:
    """(rank, world size) before the process group exists, so layout checks can run before any
    collective: the running group's when one is initialised (tests, embedding callers), else what
    the launcher set (RANK / WORLD_SIZE), else a world of one."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def resolve_device(cfg: Config, local_rank: int) -> torch.device:
    want = cfg.train.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if want == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda but no CUDA device is visible; use --device cpu")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"local rank {local_rank} but only {torch.cuda.device_count()} GPUs are visible: "
                "launch at most one process per GPU (--nproc-per-node)"
            )
        return torch.device("cuda", local_rank)
    if want != "cpu":
        raise ConfigError(f"--device {want}: use cuda or cpu")
    return torch.device("cpu")


def check_bf16(device: torch.device) -> None:
    """Refuse --bf16 on a GPU without bf16 tensor-core kernels (compute capability below 8.0).

    torch.cuda.is_bf16_supported() counts emulation, so it is true on V100 and T4, whose fused
    attention kernels then fail mid-step. Call after set_device: this asks about ``device``, the
    rank's own GPU, not device 0."""
    if device.type != "cuda":
        return
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 0):
        raise ConfigError(
            f"--bf16 given but {device} ({torch.cuda.get_device_name(device)}, compute capability "
            f"{major}.{minor}) has no bf16 kernels, which need 8.0 or newer; drop --bf16 (fp32) "
            "or use an Ampere-or-newer GPU"
        )


def init(cfg: Config) -> torch.device:
    """Validate device-level options, initialise the default process group; returns this rank's device."""
    env = os.environ
    rank, world = launch_env()
    local_rank = int(env.get("LOCAL_RANK", 0))
    device = resolve_device(cfg, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # first, so that every later query is about this rank's GPU
    if cfg.train.bf16:
        check_bf16(device)  # before the process group: nothing has communicated yet
    backend = cfg.parallel.distributed_backend or ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("--distributed-backend nccl needs CUDA devices; use gloo on CPU")
    if backend == "gloo" and device.type == "cuda":
        raise ConfigError(
            "--distributed-backend gloo cannot run megalite's send/recv and flat collectives on "
            "CUDA tensors; use nccl on GPUs (or --device cpu)"
        )
    timeout = timedelta(minutes=cfg.parallel.distributed_timeout_minutes)
    if not dist.is_initialized():
        if "MASTER_ADDR" in env:
            dist.init_process_group(
                backend,
                rank=rank,
                world_size=world,
                timeout=timeout,
                device_id=device if device.type == "cuda" else None,
            )
        elif world == 1:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            raise ConfigError("WORLD_SIZE > 1 without MASTER_ADDR: launch with torchrun")
    return device


def shutdown() -> None:
    """Destroy every process group so that none outlives this call; the one teardown path.

    Call it after everything that holds a group (model, DDP, ParallelDims) is out of scope, and
    not while an exception's traceback still pins their frames. A group that is still referenced
    here is destroyed later, by whoever drops the last reference; at interpreter exit that runs
    gloo's C++ destructor during teardown, which aborts the process ("terminate called without an
    active exception"; with torch 2.13's DeviceMesh, whose reference cycles kept its groups alive,
    about one finished 2-rank run in three). Collecting garbage first frees objects in reference
    cycles while the groups are still registered, so destroy_process_group frees every group
    while the interpreter is whole.
    """
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
