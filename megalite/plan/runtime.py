"""The planner inside pretrain.py: predict the run's own layout at start-up, compare with what
the first iterations measure, and warn on CUDA before allocating a model predicted not to fit."""

from __future__ import annotations

import os

import torch

from ..config import Config
from . import hardware
from .options import job_from
from .search import Prediction, predict
from .spec import Layout

# CUDA device-name words -> preset; the first match wins (variants first, as metrics.KNOWN_PEAK_TFLOPS)
GPU_PRESETS = ((("H200",), "h200"), (("H100",), "h100-sxm"), (("A100",), "a100-80gb"), (("B200",), "b200"))
WARMUP = 1  # iterations left out of the measured step time (allocation, kernel selection)
COMPARE_AFTER = 3  # measured iterations averaged before the comparison line


def hardware_for(device: torch.device) -> hardware.Hardware | None:
    """The preset for this device, or None when there is none (no step-time prediction then)."""
    if device.type == "cpu":
        return hardware.load("cpu") if os.path.isfile(os.path.join(hardware.PRESET_DIR, "cpu.json")) else None
    words = set(torch.cuda.get_device_name(device).upper().replace("-", " ").split())
    for need, preset in GPU_PRESETS:
        if words.issuperset(need):
            return hardware.load(preset)
    return None


class PlanCheck:
    """Prediction for this run, and the comparison once the first iterations are measured."""

    def __init__(self, cfg: Config, vocab: int, dims, device: torch.device, gpus_per_node: int, doc_length=None):
        """``doc_length``: the mean document length the attention sees under --reset-attention-mask."""
        p = cfg.parallel
        self.layout = Layout(tp=dims.tp, cp=dims.cp, dp=dims.dp, sp=dims.sequence_parallel, cp_comm=p.cp_comm_type)
        self.hw = hardware_for(device)
        ref = self.hw or hardware.load("h100-sxm")  # memory needs no rates, only the baseline
        self.pred: Prediction = predict(job_from(cfg, vocab, doc_length=doc_length), self.layout, ref, gpus_per_node)
        if self.hw is None:
            self.pred.memory["total"] -= self.pred.memory["baseline"]
        self.device, self.steps, self.mem, self.done = device, [], 0.0, False

    def startup_line(self) -> str:
        time_part = (
            f"step {self.pred.step_time_s:.3g} s" if self.hw else "step time: no hardware preset for this device"
        )
        return (
            f"megalite-plan predicts for this layout: peak memory {self.pred.mem_gib:.2f} GiB per rank "
            f"({self.pred.memory['moment']}), {time_part}" + (f" ({self.hw.name})" if self.hw else "")
        )

    def memory_warning(self) -> str | None:
        """On CUDA, a warning when the predicted peak exceeds the device's memory."""
        if self.device.type != "cuda":
            return None
        have = torch.cuda.get_device_properties(self.device).total_memory / 2**30
        if self.pred.mem_gib <= have:
            return None
        return (
            f"megalite: warning: predicted peak memory {self.pred.mem_gib:.1f} GiB per rank exceeds this GPU's "
            f"{have:.1f} GiB; consider --recompute-granularity, a larger --context-parallel-size or "
            "--tensor-parallel-size (run megalite-plan with these flags to rank layouts)"
        )

    def observe(self, record: dict) -> str | None:
        """Feed each iteration's metrics; returns the comparison line once, after the warm-up."""
        if self.done:
            return None
        self.steps.append(record["step_time"])
        self.mem = max(self.mem, record["mem_gib"])
        if len(self.steps) < WARMUP + COMPARE_AFTER:
            return None
        self.done = True
        measured = sum(self.steps[WARMUP:]) / len(self.steps[WARMUP:])
        line = f"megalite-plan vs measured: peak memory {self.pred.mem_gib:.2f} / {self.mem:.2f} GiB"
        if self.hw:
            line += f", step time {self.pred.step_time_s:.3g} / {measured:.3g} s"
        return line + f" (predicted / measured, iterations {WARMUP + 1}-{len(self.steps)})"
