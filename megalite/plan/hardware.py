"""Hardware descriptions: a JSON file per machine kind (presets in ./hardware, or a user's file).

Fields (rates per GPU or per rank, SI units in the names):
  peak_tflops                 dense bf16 tensor-core peak (datasheet; fp32 rate on CPU)
  matmul_efficiency           fraction of the peak a large GEMM reaches
  matmul_latency_us           fixed cost per GEMM call (launch + tail): small GEMMs pay it
  attention_fwd_efficiency    forward flash attention, fraction of the peak (model FLOPs)
  attention_bwd_efficiency    backward, fraction of the peak counted in the forward's FLOPs x 2
  memory_gib, memory_gbps     device memory size and bandwidth (elementwise and optimizer time)
  intra_node_gbps, intra_node_latency_us   per-GPU bandwidth/latency inside a node (NVLink)
  inter_node_gbps, inter_node_latency_us   per-GPU bandwidth/latency across nodes (IB / RoCE)
  overlap                     fraction of communication megalite issues asynchronously that
                              really hides behind compute (1.0: separate copy engines / NICs)
  process_baseline_gib        memory a rank holds before the model (CUDA context; the Python
                              process on CPU, where peak memory is the process RSS)
  op_overhead_us              host time per aten op (Python, dispatcher, autograd) that is not
                              hidden: CPU only (a GPU's host runs ahead of its asynchronous
                              kernels, and matmul_latency_us already charges each launch), so 0
  cpu_cores                   CPU only: the rates are one thread's; ranks share this many cores
                              (one rank alone runs one thread per core)
  fitted                      {field: "the published row it was fitted on"}; empty = datasheet
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

PRESET_DIR = os.path.join(os.path.dirname(__file__), "hardware")


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_tflops: float
    matmul_efficiency: float
    matmul_latency_us: float
    attention_fwd_efficiency: float
    attention_bwd_efficiency: float
    memory_gib: float
    memory_gbps: float
    intra_node_gbps: float
    intra_node_latency_us: float
    inter_node_gbps: float
    inter_node_latency_us: float
    overlap: float = 1.0
    process_baseline_gib: float = 0.0
    op_overhead_us: float = 0.0
    cpu_cores: int = 0  # CPU: rates are one thread's, this many run at once; 0 on GPUs
    fitted: dict = field(default_factory=dict)
    notes: str = ""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"


def presets() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(PRESET_DIR) if f.endswith(".json"))


def load(name_or_file: str) -> Hardware:
    """A preset name (``h100-sxm``) or a JSON file path."""
    path = name_or_file if name_or_file.endswith(".json") else os.path.join(PRESET_DIR, name_or_file + ".json")
    if not os.path.isfile(path):
        raise ValueError(
            f"--hardware {name_or_file}: no such file or preset; presets: {', '.join(presets())} "
            "(or a JSON file; `megalite-plan --calibrate` writes one for this machine)"
        )
    with open(path) as fh:
        raw = json.load(fh)
    known = {f.name for f in dataclasses.fields(Hardware)}
    unknown = sorted(set(raw) - known)
    missing = sorted(f.name for f in dataclasses.fields(Hardware) if f.default is dataclasses.MISSING)
    missing = [k for k in missing if k not in raw]
    if unknown or missing:
        raise ValueError(f"hardware file {path}: unknown keys {unknown}, missing keys {missing}")
    return Hardware(**raw)
