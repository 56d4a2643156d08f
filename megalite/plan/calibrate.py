"""`megalite-plan --calibrate OUT.json`: measure this machine and write its hardware file.

Microbenchmarks only (never the training runs the planner is judged on):
  GEMM at a few sizes            -> rate (peak_tflops, efficiency 1), and an 8 x 8 GEMM's time
                                    as the fixed cost per call (matmul_latency_us)
  the attention block kernel     -> forward and backward efficiencies against that rate
  a large out-of-place add       -> memory bandwidth (elementwise and optimizer time)
  forward + backward of a chain  -> op_overhead_us: host time per aten op (CPU only), the chain's
  of tiny linear layers             time over the ops a TorchDispatchMode counts in it
  2 gloo ranks: send/recv, all-reduce, all-gather at a few sizes -> α-β of the link, and how
                                    much of a send hides behind a GEMM (overlap)
  the smallest pretrain.py run   -> process_baseline_gib: its peak RSS less the tensor bytes the
                                    planner predicts for it (peak memory on CPU is the process RSS)
On CPU the rates are one thread's (torchrun gives each rank one) and ``cpu_cores`` says how many
run at once; on CUDA they are one GPU's, in bf16.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

from .hardware import Hardware

SIZES = (128, 256, 512, 1024)
MESSAGE_BYTES = (2**12, 2**18, 2**22)


def _timed(fn, repeat: int = 9) -> float:
    """Fastest of ``repeat`` calls after one warm-up: what the machine can do, the least
    disturbed by other processes (a shared machine only ever adds time)."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def _fit(xs, ys) -> tuple[float, float]:
    """(intercept, slope) of least squares y = a + b x, the intercept kept >= 0."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return max(my - slope * mx, 0.0), slope


def gemm(device, dtype) -> tuple[float, float]:
    """(FLOP/s, latency s) of square GEMMs: the latency is an 8 x 8 GEMM's time (a fit's
    intercept is lost in the noise of the large sizes), the rate the best of the large sizes
    once the latency is taken off."""
    tiny = torch.randn(8, 8, device=device, dtype=dtype)
    latency = _timed(lambda: tiny @ tiny, repeat=50)
    rate = 0.0
    for n in SIZES:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        rate = max(rate, 2 * n**3 / max(_timed(lambda a=a, b=b: a @ b) - latency, 1e-9))
    return rate, latency


def attention(device, dtype, rate) -> tuple[float, float]:
    """Forward and backward efficiency of causal attention (model FLOPs, causal half) vs ``rate``."""
    from ..ops.attention import get_backend

    b, s, h, d = 1, 1024, 4, 64
    backend = get_backend("auto", device, dtype, d)
    q, k, v = (torch.randn(b, s, h, d, device=device, dtype=dtype) for _ in range(3))
    scale = d**-0.5
    out, lse = backend.forward(q, k, v, True, scale)
    fwd = _timed(lambda: backend.forward(q, k, v, True, scale))
    bwd = _timed(lambda: backend.backward(out, q, k, v, out, lse, True, scale))
    flops = 4 * b * h * d * s * s / 2
    return flops / fwd / rate, 2 * flops / bwd / rate


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched inside it (autograd's backward kernels included)."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def op_overhead() -> float:
    """Seconds per op of a chain of 4 x 8 linear layers with autograd: the tensors are so small
    that the time is the host's per-op cost."""
    layer = torch.nn.Linear(8, 8)

    def chain():
        x = torch.randn(4, 8, requires_grad=True)
        for _ in range(20):
            x = torch.nn.functional.gelu(layer(x)) * 0.5 + x
        x.sum().backward()

    with OpCounter() as counter:
        chain()
    return _timed(chain, repeat=20) / counter.ops


def bandwidth(device) -> float:
    """Bytes/s of an out-of-place add, as the model's elementwise work runs: each op writes a new
    tensor, which on CPU costs fresh pages (about half a plain copy's rate)."""
    x = torch.randn(2**25, device=device)
    y = torch.randn_like(x)
    return 3 * x.numel() * 4 / _timed(lambda: x + y)


def _comm_rank(rank, world, store_path, out_path):
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=120))
    peer = 1 - rank
    rows = []
    for nbytes in MESSAGE_BYTES:
        x = torch.zeros(nbytes // 4)
        buf = torch.empty_like(x)

        def p2p(x=x, buf=buf):
            for req in dist.batch_isend_irecv([dist.P2POp(dist.isend, x, peer), dist.P2POp(dist.irecv, buf, peer)]):
                req.wait()

        gathered = torch.empty(x.numel() * world)
        rows.append(
            (
                nbytes,
                _timed(p2p),
                _timed(lambda x=x: dist.all_reduce(x)),
                _timed(lambda x=x, g=gathered: dist.all_gather_into_tensor(g, x)),
            )
        )
    # overlap: a large exchange posted, then a GEMM, as ring attention does
    a = torch.randn(384, 384)
    x, buf = torch.zeros(2**20), torch.empty(2**20)

    def gemms():
        for _ in range(4):
            a @ a

    def exchange():
        return dist.batch_isend_irecv([dist.P2POp(dist.isend, x, peer), dist.P2POp(dist.irecv, buf, peer)])

    def both():
        reqs = exchange()
        gemms()
        for r in reqs:
            r.wait()

    def alone():
        for r in exchange():
            r.wait()

    t_gemm, t_comm, t_both = _timed(gemms), _timed(alone), _timed(both)
    if rank == 0:
        torch.save({"rows": rows, "overlap": (t_gemm, t_comm, t_both)}, out_path)
    dist.barrier()
    dist.destroy_process_group()


def communication() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "comm.pt")
        mp.start_processes(_comm_rank, args=(2, os.path.join(tmp, "store"), out), nprocs=2, start_method="spawn")
        res = torch.load(out)
    sizes = [r[0] for r in res["rows"]]
    p2p_lat, p2p_per_byte = _fit(sizes, [r[1] for r in res["rows"]])
    # 2 ranks: an all-reduce moves 2 (n - 1) / n = 1 message each way in 2 latency steps
    ar_lat, ar_per_byte = _fit(sizes, [r[2] for r in res["rows"]])
    t_gemm, t_comm, t_both = res["overlap"]
    hidden = (t_gemm + t_comm - t_both) / min(t_gemm, t_comm)
    return {
        "gbps": 1 / min(p2p_per_byte, ar_per_byte) / 1e9,
        "latency_us": max(p2p_lat, ar_lat / 2) * 1e6,
        "overlap": min(max(hidden, 0.0), 1.0),
    }


def calibrate(path: str) -> Hardware:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if not cuda:
        torch.set_num_threads(1)
    rate, latency = gemm(device, dtype)
    fwd, bwd = attention(device, dtype, rate)
    comm = communication()
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    hw = Hardware(
        name=name,
        peak_tflops=rate / 1e12,
        matmul_efficiency=1.0,
        matmul_latency_us=latency * 1e6,
        attention_fwd_efficiency=fwd,
        attention_bwd_efficiency=bwd,
        memory_gib=(torch.cuda.get_device_properties(device).total_memory if cuda else _host_memory()) / 2**30,
        memory_gbps=bandwidth(device) / 1e9,
        intra_node_gbps=comm["gbps"],
        intra_node_latency_us=comm["latency_us"],
        inter_node_gbps=comm["gbps"],
        inter_node_latency_us=comm["latency_us"],
        overlap=comm["overlap"],
        process_baseline_gib=0.0 if cuda else baseline(),
        op_overhead_us=0.0 if cuda else op_overhead() * 1e6,
        cpu_cores=0 if cuda else os.cpu_count(),
        notes=f"measured by megalite-plan --calibrate on {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, "
        f"load average {os.getloadavg()[0]:.1f}; gloo over loopback, so inter-node = intra-node",
    )
    with open(path, "w") as fh:
        fh.write(hw.to_json())
    print(f"wrote {path}:\n{hw.to_json()}")
    return hw


BASELINE_RUN = ["--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "32",
                "--micro-batch-size", "1", "--train-iters", "2", "--eval-interval", "0"]  # fmt: skip


def baseline() -> float:
    """GiB a pretrain.py process holds besides its tensors (interpreter, modules, tokenizer, data
    index, allocator): a one-layer, 32-token run's peak RSS less the planner's tensor bytes."""
    from .. import config as C
    from ..data.default_corpus import ensure_default_corpus
    from ..data.tokenizer import Tokenizer
    from .options import job_from
    from .search import predict
    from .spec import Layout

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-c", "from megalite.training.main import cli; cli()", *BASELINE_RUN, "--log-dir", tmp]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "WANDB_MODE": "disabled"})
        with open(os.path.join(tmp, "metrics.jsonl")) as fh:
            rss = max(json.loads(line)["mem_gib"] for line in fh)
    cfg = C.parse(BASELINE_RUN)
    cfg.train.global_batch_size = 1
    vocab = Tokenizer(ensure_default_corpus(log=lambda *a: None)[1]).vocab_size
    ref = Hardware("ref", 1, 1, 0, 1, 1, 1, 1, 1, 0, 1, 0)  # rates are irrelevant to memory
    return rss - predict(job_from(cfg, vocab), Layout(), ref, 1).mem_gib


def _host_memory() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
