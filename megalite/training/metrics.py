"""Metrics: a Megatron-style console line, one JSON object per iteration, optional wandb.

Only the logging rank (global rank 0) creates a MetricsLogger; the others pass None.
"""

from __future__ import annotations

import json
import os
import re
import resource
import sys
import time

import torch

# Dense (no 2:4 sparsity) bf16 tensor-core peak TFLOP/s per GPU model, from the vendor datasheets
# (which print twice these, with sparsity). A row matches when all its words are words of the
# device name; the first match wins, so a variant (PCIe, NVL) comes before its SXM base name.
KNOWN_PEAK_TFLOPS = (
    (("H100", "NVL"), "H100 NVL", 835.0),
    (("H100", "PCIe"), "H100 PCIe", 756.0),
    (("H100",), "H100 SXM", 989.0),
    (("GH200",), "GH200", 989.0),
    (("H200", "NVL"), "H200 NVL", 835.0),
    (("H200",), "H200 SXM", 989.0),
    (("A100",), "A100", 312.0),
    (("L40S",), "L40S", 362.0),
    (("L40",), "L40", 181.0),
    (("A10G",), "A10G", 70.0),
    (("A10",), "A10", 125.0),
)


def peak_tflops(device: torch.device, given: float | None) -> tuple[float | None, str]:
    """(device peak TFLOP/s for MFU, where it came from), the peak None when it is unknown."""
    if given:
        return given, f"{given:g} TFLOP/s from --peak-tflops"
    if device.type != "cuda":
        return None, "unknown on cpu"
    name = torch.cuda.get_device_name(device)
    words = set(re.split(r"[\s_-]+", name.upper()))
    for need, model, peak in KNOWN_PEAK_TFLOPS:
        if words.issuperset(w.upper() for w in need):
            return peak, f"{peak:g} TFLOP/s ({model}, dense bf16)"
    return None, f"unknown for {name}; give --peak-tflops"


def flops_per_token(model_cfg, matmul_params: int, seq_len: int, full_attention: bool = False) -> float:
    """Model FLOPs of one training token, forward + backward, counting matmuls only (the MFU convention):
    6 N for the N weights that multiply activations (2 forward, 4 backward; lookup tables, norm gains
    and biases are not matmuls, see ``GPT.num_params(matmul_only=True)``), plus the attention scores
    and their weighted sum: 12 L s (heads x head_dim) over the full s x s square, or half that by
    default, the causal triangle the attention kernels compute. ``full_attention`` gives the
    Megatron-LM / PaLM convention for comparing with systems that report it. Recomputed activations
    are not counted."""
    attn_width = model_cfg.num_attention_heads * model_cfg.head_dim
    attention = 12.0 * model_cfg.num_layers * attn_width * seq_len
    return 6.0 * matmul_params + (attention if full_attention else attention / 2)


def memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricsLogger:
    def __init__(self, log_dir: str, cfg, run_config: dict, peak: float | None = None, plan=None):
        self.peak = peak  # device peak TFLOP/s for MFU; None when unknown
        self.plan = plan  # megalite.plan.runtime.PlanCheck: prints predicted vs measured once
        os.makedirs(log_dir, exist_ok=True)
        self.path = os.path.join(log_dir, "metrics.jsonl")
        self.fh = open(self.path, "a")
        self.interval = cfg.logging.log_interval
        self.wandb = None
        if cfg.logging.wandb_project:
            self.wandb = _start_wandb(cfg, log_dir, run_config)

    def log(self, record: dict, line: bool) -> None:
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "iteration"}, step=record["iteration"])
        if line:
            print(format_line(record), flush=True)
        compared = self.plan.observe(record) if self.plan else None
        if compared:
            print(compared, flush=True)

    def close(self) -> None:
        self.fh.close()
        if self.wandb is not None:
            self.wandb.finish()


def _start_wandb(cfg, log_dir: str, run_config: dict):
    try:
        import wandb
    except ImportError:
        raise RuntimeError("--wandb-project given but wandb is not installed; pip install wandb") from None
    mode = os.environ.get("WANDB_MODE")
    if mode is None and not os.environ.get("WANDB_API_KEY"):
        mode = "offline"  # no key: never block on a login prompt or the network
        print(f"wandb: no WANDB_API_KEY, logging offline under {log_dir}", file=sys.stderr)
    return wandb.init(
        project=cfg.logging.wandb_project, name=cfg.logging.wandb_exp_name, dir=log_dir, mode=mode, config=run_config
    )


def format_line(r: dict) -> str:
    parts = [
        f"iteration {r['iteration']:>6d}/{r['train_iters']:>6d}",
        f"consumed samples: {r['consumed_samples']:>9d}",
        f"elapsed time per iteration (ms): {r['step_time'] * 1e3:.1f}",
        f"learning rate: {r['lr']:.3E}",
        f"lm loss: {r['loss']:.6E}",
        f"grad norm: {r['grad_norm']:.3f}",
        f"tokens/s: {r['tokens_per_sec']:.0f}",
        f"TFLOP/s/GPU: {r['tflops_per_device']:.2f}",
    ]
    if r.get("mfu") is not None:
        parts.append(f"MFU: {100 * r['mfu']:.1f}%")
    if r.get("skipped_iterations"):
        parts.append(
            f"skipped iterations: {r['skipped_iterations']}"
            + (" (this update skipped: non-finite loss or gradient)" if r["skipped"] else "")
        )
    parts.append(f"mem: {r['mem_gib']:.2f} GiB")
    if "valid_loss" in r:
        parts.append(f"valid loss: {r['valid_loss']:.6E}")
    parts.append(f"ETA: {time.strftime('%H:%M:%S', time.gmtime(r['eta_s']))}")
    return " | ".join(parts)
