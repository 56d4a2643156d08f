"""Step time of a layout: compute, exposed communication and pipeline bubble.

Compute: each GEMM costs 2mkn / (peak x matmul_efficiency) plus a fixed latency, so small
problems reach a lower fraction of the peak (the achieved efficiency falls with size);
flash attention runs at its own forward and backward efficiencies; elementwise work (norms,
RoPE, activations, the loss) streams its bytes at the memory bandwidth and pays a fixed cost per
kernel. On CPU every aten op also costs the host a fixed time (op_overhead_us: Python,
dispatcher, autograd), counted per op of the one-rank model (LAYER_OPS, STEP_OPS).
Communication, α-β per collective on the link the group spans (a group whose members are
``stride`` ranks apart leaves the node when stride x size exceeds --gpus-per-node):
  TP   2 all-reduces (or all-gather + reduce-scatter under SP, the same bytes) per layer forward
       and 2 backward, exposed: megalite issues them in line with compute;
  CP   p2p: CP-1 K/V hops forward, K/V + fp32 dK/dV hops backward, each hidden behind one
       block of attention (ring_attention posts the next hop first), only the excess exposed;
       all_gather: K/V gathered / dK/dV reduce-scattered, exposed; a2a: 4 all-to-alls each way;
       a2a+p2p: the all-to-alls inside groups of A (one node), the ring across CP / A groups;
  DP   gradient reduction (and sharded weights' gathers) over DP x CP, see _dp_time.
Sequence-tiled MLP: the MLP forward runs again in backward. Activation offload: the copies to
and from host memory are assumed hidden behind compute (they are asynchronous).
Pipeline: 1F1B over p stages and m micro-batches takes (m + (p - 1) / v) stage-times with v
virtual stages per rank (Narayanan et al.): the bubble is (p - 1) / (v m) of the useful time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import padded_vocab_size
from .flops import attention_pairs
from .hardware import Hardware
from .memory import layer_activation_bytes, stage_params, state_bytes_per_param
from .spec import Job, Layout

OPS_PER_LAYER = 24  # elementwise kernels of one layer's forward (norms, RoPE, copies, activation, adds)
# aten ops megalite's one-rank model dispatches, (forward, backward), as a TorchDispatchMode counts
# them (tests/test_plan.py): per layer by swiglu, and once per micro-batch (embedding, final norm,
# logits, loss), at micro-batch > 1 (batch 1 skips a few views); TP / CP add a few collectives and
# copies, not counted
LAYER_OPS = {False: (51, 86), True: (56, 101)}
STEP_OPS = (34, 23)


@dataclass
class Link:
    gbps: float
    latency_us: float

    def time(self, kind: str, nbytes: float, n: int) -> float:
        """Seconds of one collective of ``nbytes`` (the full tensor) over ``n`` ranks (ring algorithms)."""
        if n <= 1 or nbytes <= 0:
            return 0.0
        steps = {"all_reduce": 2 * (n - 1), "all_gather": n - 1, "reduce_scatter": n - 1, "all_to_all": n - 1}
        if kind == "p2p":
            return nbytes / (self.gbps * 1e9) + self.latency_us * 1e-6
        return steps[kind] / n * nbytes / (self.gbps * 1e9) + steps[kind] * self.latency_us * 1e-6


def link(hw: Hardware, stride: int, size: int, gpus_per_node: int) -> Link:
    if stride * size <= gpus_per_node:
        return Link(hw.intra_node_gbps, hw.intra_node_latency_us)
    return Link(hw.inter_node_gbps, hw.inter_node_latency_us)


@dataclass
class StepTime:
    compute: float
    exposed_comm: float
    bubble: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.compute + self.exposed_comm + self.bubble + self.optimizer


class _Rank:
    """Per-micro-batch costs on one rank of the busiest stage."""

    def __init__(self, job: Job, lay: Layout, hw: Hardware, gpus_per_node: int):
        self.job, self.lay, self.hw = job, lay, hw
        self.tokens = job.micro_batch_size * job.seq_length / lay.cp
        self.gpus_per_node = gpus_per_node
        self.tp_link = link(hw, 1, lay.tp, gpus_per_node)
        self.cp_link = link(hw, lay.tp, lay.cp, gpus_per_node)
        self.overlap = hw.overlap
        # CPU: rates are one thread's; one rank runs a thread per core, several share the cores
        ranks = lay.gpus
        self.speed = 1.0 if not hw.cpu_cores else (hw.cpu_cores if ranks == 1 else min(1.0, hw.cpu_cores / ranks))
        self.op_s = hw.op_overhead_us * 1e-6 / min(self.speed, 1.0)  # the host side runs one thread

    def gemm(self, k: float, n: float, m: float | None = None) -> float:
        m = self.tokens if m is None else m
        hw = self.hw
        return 2 * m * k * n / (hw.peak_tflops * 1e12 * hw.matmul_efficiency * self.speed) + hw.matmul_latency_us * 1e-6

    def stream(self, nbytes: float, ops: int) -> float:
        return nbytes / (self.hw.memory_gbps * 1e9 * self.speed) + ops * self.hw.matmul_latency_us * 1e-6

    def layer(self) -> dict:
        """Forward and backward seconds of one layer: compute pieces and exposed communication."""
        job, lay, hw, m = self.job, self.lay, self.hw, self.job.model
        t, d, h = lay.tp, m.head_dim, m.hidden_size
        n, g, f = m.num_attention_heads / t, m.num_kv_heads / t, m.ffn_size / t
        mlp = (2 if m.swiglu else 1) * self.gemm(h, f) + self.gemm(f, h)
        linear = self.gemm(h, (n + 2 * g) * d) + self.gemm(n * d, h) + mlp
        pairs = attention_pairs(job.seq_length, job.doc_length) / lay.cp
        attn_flops = 4 * job.micro_batch_size * pairs * n * d
        peak = hw.peak_tflops * 1e12 * self.speed
        attn_f = attn_flops / (peak * hw.attention_fwd_efficiency) + lay.cp * hw.matmul_latency_us * 1e-6
        attn_b = 2 * attn_flops / (peak * hw.attention_bwd_efficiency) + lay.cp * hw.matmul_latency_us * 1e-6
        if not job.flash_attention:  # batched GEMMs over the whole square + softmax/dropout passes over the scores
            square = 4 * job.micro_batch_size * (job.seq_length / lay.cp) ** 2 * n * d
            scores = job.micro_batch_size * n * (job.seq_length / lay.cp) ** 2 * job.act_bytes
            attn_f = square / (peak * hw.matmul_efficiency) + self.stream(4 * scores, 4)
            attn_b = 2 * square / (peak * hw.matmul_efficiency) + self.stream(6 * scores, 4)
        plain = Job(**{**job.__dict__, "recompute": None, "megatron": False})
        elem = self.stream(2 * layer_activation_bytes(plain, lay, self.tokens), OPS_PER_LAYER)
        a = job.act_bytes
        tp_bytes = self.tokens * h * a
        tp = 2 * self.tp_link.time("all_reduce", tp_bytes, t) if t > 1 else 0.0
        if job.megatron and job.tp_overlap:
            tp *= 1 - hw.overlap
        cp_f, cp_b = self._cp(a, g * d, n * d, attn_f, attn_b)
        ops_f, ops_b = (n * self.op_s for n in LAYER_OPS[m.swiglu])
        fwd = linear + attn_f + elem + tp + cp_f + ops_f
        bwd = 2 * linear + attn_b + 2 * elem + tp + cp_b + ops_b
        if job.recompute == "full":
            bwd += fwd
        elif job.recompute == "selective":
            bwd += attn_f
        if job.mlp_tile and job.recompute != "full":  # each tile's intermediates rebuilt in backward
            bwd += mlp
        return {"fwd": fwd, "bwd": bwd, "comm": 2 * tp + cp_f + cp_b + (tp + cp_f if job.recompute == "full" else 0)}

    def _cp(self, a, kv_width, q_width, attn_f, attn_b):
        lay, cp = self.lay, self.lay.cp
        if cp == 1:
            return 0.0, 0.0
        kv = 2 * self.tokens * kv_width * a
        if lay.cp_comm == "p2p":
            hop_f = self.cp_link.time("p2p", kv, 2)
            hop_b = self.cp_link.time("p2p", kv + 2 * self.tokens * kv_width * 4, 2)
            step_f, step_b = attn_f / cp, attn_b / cp

            def exposed(hop, step):
                return max(hop - self.overlap * step, (1 - self.overlap) * hop)

            return (cp - 1) * exposed(hop_f, step_f), (cp - 1) * exposed(hop_b, step_b) + hop_b
        if lay.cp_comm == "all_gather":
            ag = self.cp_link.time("all_gather", kv * cp, cp)
            return ag, ag + self.cp_link.time("reduce_scatter", kv * cp * 4 / a, cp)
        if lay.cp_comm == "a2a+p2p":  # all-to-all inside groups of A, a ring of the A-token blocks across them
            a_size, rings = self.job.hier_a2a, cp // self.job.hier_a2a
            inner = link(self.hw, lay.tp, a_size, self.gpus_per_node)
            a2a = inner.time("all_to_all", self.tokens * (2 * q_width + 2 * kv_width) * a, a_size)
            outer = link(self.hw, lay.tp * a_size, rings, self.gpus_per_node)
            hop_f, hop_b = outer.time("p2p", kv, 2), outer.time("p2p", kv * (1 + 4 / a), 2)
            f = a2a + (rings - 1) * max(hop_f - self.overlap * attn_f / rings, (1 - self.overlap) * hop_f)
            b = a2a + (rings - 1) * max(hop_b - self.overlap * attn_b / rings, (1 - self.overlap) * hop_b)
            return f, b + (hop_b if rings > 1 else 0.0)
        a2a = self.cp_link.time("all_to_all", self.tokens * (2 * q_width + 2 * kv_width) * a, cp)
        return a2a, a2a

    def logits(self) -> tuple[float, float]:
        job, lay, m = self.job, self.lay, self.job.model
        v = padded_vocab_size(job.vocab_size, m.make_vocab_size_divisible_by, lay.tp) / lay.tp
        gemm = self.gemm(m.hidden_size, v)
        elem = self.stream(self.tokens * v * (job.act_bytes + 4) * 3, 6)
        ops_f, ops_b = (n * self.op_s for n in STEP_OPS)
        return gemm + elem + ops_f, 2 * gemm + elem + ops_b


def step_time(job: Job, lay: Layout, hw: Hardware, gpus_per_node: int) -> StepTime:
    r = _Rank(job, lay, hw, gpus_per_node)
    layer = r.layer()
    layers = math.ceil(job.model.num_layers / lay.pp)
    lf, lb = r.logits()
    fwd, bwd = layers * layer["fwd"] + lf, layers * layer["bwd"] + lb
    per_mb = fwd + bwd
    m = lay.micro_batches(job)
    layer_comm = m * layers * layer["comm"]  # exposed TP / CP communication inside the micro-batches
    bubble = (lay.pp - 1) / lay.vpp * per_mb if lay.pp > 1 else 0.0
    pp_comm = 0.0
    if lay.pp > 1:  # activations and their gradients cross stage boundaries, v times per micro-batch
        act = r.tokens * job.model.hidden_size * job.act_bytes / (lay.tp if lay.sp else 1)
        pp_link = link(hw, lay.tp * lay.cp * lay.dp, 2, gpus_per_node)
        pp_comm = 2 * lay.vpp * m * pp_link.time("p2p", act, 2) * (1 - hw.overlap if job.megatron else 1)
    params = stage_params(job, lay)
    shard = lay.dp * lay.cp
    dp_exposed = _dp_time(job, lay, hw, gpus_per_node, params, shard, m, bwd, fwd)
    per = state_bytes_per_param(job, shard)
    opt_bytes = params * (per["optimizer"] * 2 + per["grads"] + per["weights"] * 2)
    n_tensors = layers * 12 + 4
    optimizer = opt_bytes / (hw.memory_gbps * 1e9) + n_tensors * hw.matmul_latency_us * 1e-6 * 8
    return StepTime(m * per_mb - layer_comm, layer_comm + pp_comm + dp_exposed, bubble, optimizer)


def _dp_time(job, lay, hw, gpus_per_node, params, shard, micro_batches, backward, forward):
    """Exposed seconds of the DP x CP gradient (and weight) traffic of one step.

    no_shard: one all-reduce of the fp32 gradients after the last micro-batch. Sharded: a
    reduce-scatter of the gradients and an all-gather of the compute weights; Megatron's
    distributed optimizer does them once per step, FSDP2 every micro-batch (twice the gather
    with optim_grads_params, whose weights are freed after forward). Reductions hide behind
    backward (DDP's buckets; FSDP2 with --overlap-grad-reduce) bar the last bucket, gathers behind
    forward (prefetch)."""
    if shard == 1:
        return 0.0
    dp_link = link(hw, lay.tp, shard, gpus_per_node)
    grads, weights = params * 4, params * (2 if job.precision == "bf16" else 4)
    per_step = 1 if not job.fsdp else micro_batches
    if job.sharding == "no_shard":
        reduce, gather = dp_link.time("all_reduce", grads, shard), 0.0
    else:
        reduce = per_step * dp_link.time("reduce_scatter", grads, shard)
        gather = per_step * dp_link.time("all_gather", weights, shard)
    if job.sharding == "optim_grads_params":
        gather *= 2 if job.fsdp else 2 * micro_batches
    layers = max(job.model.num_layers, 1)
    overlap = hw.overlap if (job.overlap_grad_reduce or not job.fsdp) else 0.0

    def exposed(total, behind, overlap):
        return max(total - overlap * behind * (1 - 1 / layers), total * (1 - overlap), total / layers)

    hidden_reduce = exposed(reduce, backward * (per_step if job.sharding != "no_shard" else 1), overlap)
    return hidden_reduce + (exposed(gather, forward * micro_batches, hw.overlap) if gather else 0.0)
