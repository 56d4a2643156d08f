"""Enumerate layouts for a job on a cluster, predict each, rank the ones that fit."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .flops import step_model_flops
from .hardware import Hardware
from .memory import GIB, breakdown
from .spec import Job, Layout
from .timing import step_time


def cp_comms() -> list[str]:
    """pretrain.py's --cp-comm-type choices (a2a+p2p once megalite has it)."""
    from ..config import ParallelConfig

    field = next(f for f in dataclasses.fields(ParallelConfig) if f.name == "cp_comm_type")
    return list(field.metadata["choices"])


RECOMPUTE = (None, "selective", "full")


@dataclass
class Prediction:
    job: Job
    layout: Layout
    step_time_s: float
    compute_s: float
    exposed_comm_s: float
    bubble_s: float
    optimizer_s: float
    tokens_per_s_per_gpu: float
    tflops_per_gpu: float
    mfu: float
    memory: dict  # bytes by kind, and total
    fits: bool

    @property
    def mem_gib(self) -> float:
        return self.memory["total"] / GIB

    def as_dict(self) -> dict:
        lay = self.layout
        return {
            "tp": lay.tp,
            "cp": lay.cp,
            "dp": lay.dp,
            "pp": lay.pp,
            "vpp": lay.vpp,
            "sp": lay.sp,
            "cp_comm_type": lay.cp_comm,
            "recompute": self.job.recompute,
            "step_time_s": self.step_time_s,
            "compute_s": self.compute_s,
            "exposed_comm_s": self.exposed_comm_s,
            "bubble_s": self.bubble_s,
            "optimizer_s": self.optimizer_s,
            "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu,
            "tflops_per_gpu": self.tflops_per_gpu,
            "mfu": self.mfu,
            "mem_gib": self.mem_gib,
            "mem_breakdown_gib": {k: v / GIB for k, v in self.memory.items() if k not in ("total", "moment")},
            "mem_peak_at": self.memory["moment"],
            "fits": self.fits,
        }


def predict(job: Job, lay: Layout, hw: Hardware, gpus_per_node: int, full_square: bool = False) -> Prediction:
    """Step time, throughput and peak memory of ``job`` under ``lay``. ``full_square``: count
    TFLOP/s with the full attention square (published figures' convention)."""
    t = step_time(job, lay, hw, gpus_per_node)
    mem = breakdown(job, lay, hw.process_baseline_gib)
    flops = step_model_flops(
        job.model, job.vocab_size, job.seq_length, job.global_batch_size, job.doc_length, full_square
    )
    gpus = lay.gpus
    tflops = flops / t.total / gpus / 1e12
    return Prediction(
        job,
        lay,
        t.total,
        t.compute,
        t.exposed_comm,
        t.bubble,
        t.optimizer,
        job.global_batch_size * job.seq_length / t.total / gpus,
        tflops,
        tflops / hw.peak_tflops,
        mem,
        mem["total"] <= hw.memory_gib * GIB,
    )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(job: Job, gpus: int, gpus_per_node: int, fixed: dict) -> list[tuple[Job, Layout]]:
    """Every (job variant, layout) megalite's checks would accept: TP within a node dividing the
    heads, KV heads and MLP width; sequence divisible by 2 CP (x TP under SP); batch divisible
    by micro batch x DP; layers divisible by PP x virtual stages. ``fixed`` pins any of tp, cp,
    pp, vpp, cp_comm, recompute."""
    m = job.model
    out = []
    for tp in [fixed["tp"]] if "tp" in fixed else _divisors(min(gpus, gpus_per_node)):
        if any(x % tp for x in (m.num_attention_heads, m.num_kv_heads, m.ffn_size)):
            continue
        sp = tp > 1
        for cp in [fixed["cp"]] if "cp" in fixed else _divisors(gpus // tp):
            if job.seq_length % (2 * cp * (tp if sp else 1)) and cp > 1 or job.seq_length % (tp if sp else 1):
                continue
            for pp in [fixed["pp"]] if "pp" in fixed else _divisors(gpus // (tp * cp)):
                if gpus % (tp * cp * pp) or m.num_layers % pp:
                    continue
                dp = gpus // (tp * cp * pp)
                if job.global_batch_size % (job.micro_batch_size * dp):
                    continue
                vpps = [fixed["vpp"]] if "vpp" in fixed else [v for v in (1, 2, 4, 8) if (m.num_layers // pp) % v == 0]
                for vpp in vpps if pp > 1 else [1]:
                    comms = [fixed["cp_comm"]] if "cp_comm" in fixed else cp_comms()
                    for comm in comms if cp > 1 else ["p2p"]:
                        if comm == "a2a" and (m.num_kv_heads // tp) % cp:
                            continue
                        hier = job.hier_a2a
                        if comm == "a2a+p2p" and not hier:  # the largest all-to-all group inside a node
                            fits = [a for a in _divisors(cp) if 1 < a < cp and tp * a <= gpus_per_node]
                            if not fits:
                                continue
                            hier = fits[-1]
                        for rc in [fixed["recompute"]] if "recompute" in fixed else RECOMPUTE:
                            variant = dataclasses.replace(job, recompute=rc, hier_a2a=hier)
                            out.append((variant, Layout(tp, cp, dp, pp, vpp, sp, comm)))
    return out


def rank(job: Job, hw: Hardware, gpus: int, gpus_per_node: int, fixed: dict) -> list[Prediction]:
    """Predictions for every layout, those that fit first, fastest first."""
    preds = [predict(j, lay, hw, gpus_per_node) for j, lay in layouts(job, gpus, gpus_per_node, fixed)]
    return sorted(preds, key=lambda p: (not p.fits, p.step_time_s))
