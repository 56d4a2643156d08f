"""Long-context memory: peak bytes per rank for one Llama-3-8B-shaped layer, plain vs token-tiled
loss vs tiled loss + sequence-tiled MLP, and the step-time cost of each.

Model: embedding + one decoder layer (hidden 4096, SwiGLU 14336, GQA 32/8 heads, RMSNorm, no
biases, untied output) + vocabulary 128,256; bf16 autocast over fp32 weights, one sequence.
CP=4 is simulated by the per-rank sequence length (seq / 4): every per-token tensor is then what a
CP rank holds; the ring's in-flight K/V blocks (2 x [seq/4, 8 heads, 128] bf16 each way) are not
counted.

Memory method: the real megalite code runs on fake tensors (torch's FakeTensorMode: shapes and
dtypes, no data, no compute) under megalite.plan.live_bytes, a dispatch mode that adds each new
tensor storage's bytes when an op creates it and subtracts them when the storage is freed, so the
figures are the bytes the allocator is asked for (no fragmentation, no library workspaces). ``--validate`` runs the same
accounting on real tensors for a small shape and compares it with fake tensors and with the
process's ru_maxrss growth (a fresh subprocess per mode). Measured per configuration:

- step: peak over one forward + backward, parameters included;
- loss path: peak bytes the output layer + loss add on top of the final hidden states, forward
  and backward (also without the output weight's fp32 gradient, which every path produces);
- MLP saved: bytes the MLP keeps for backward (saved-tensor hooks, unique storages, weight casts
  excluded).

Step time (``--time``): real runs at a scaled shape that runs quickly on CPU (hidden 1024, SwiGLU
3584, GQA 8/2, vocabulary 32,064: the 8B layer's proportions, output layer included), best of
repeats, modes interleaved.

    python benchmarks/bench_memory.py [--seq 4096 8192 16384 32768] [--time] [--validate]

Writes benchmarks/results/memory.json and memory.png.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from megalite.config import ModelConfig
from megalite.model import GPT
from megalite.plan.live_bytes import LiveBytes

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
GIB = 2**30
MACHINE_GIB = 24
LLAMA8B_LAYER = dict(
    num_layers=1,
    hidden_size=4096,
    ffn_hidden_size=14336,
    num_attention_heads=32,
    group_query_attention=True,
    num_query_groups=8,
    swiglu=True,
    normalization="RMSNorm",
    add_bias_linear=False,
    untie_embeddings_and_output_weights=True,
    rotary_base=500000.0,
    norm_impl="torch",
)
VOCAB = 128256
SCALED = dict(LLAMA8B_LAYER, hidden_size=1024, ffn_hidden_size=3584, num_attention_heads=8, num_query_groups=2)
SCALED_VOCAB = 32064
MODES = {
    "plain": dict(loss_chunk_size=0),
    "fused loss": dict(loss_chunk_size=1024),
    "fused loss + tiled MLP": dict(loss_chunk_size=1024, mlp_tile_size=2048),
}


def build(shape, vocab, mode, seq):
    cfg = ModelConfig(**shape, **MODES[mode], seq_length=seq, make_vocab_size_divisible_by=128)
    return GPT(cfg, vocab), cfg


def inputs(vocab, seq):
    tokens = torch.randint(0, vocab, (1, seq))
    return dict(tokens=tokens, position_ids=torch.arange(seq)[None], labels=tokens, loss_mask=torch.ones(1, seq))


def measure(shape, vocab, mode, seq):
    """The three figures for one configuration; call under FakeTensorMode (or not, for real)."""
    model, cfg = build(shape, vocab, mode, seq)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    batch = inputs(vocab, seq)
    with LiveBytes() as live:
        with autocast:
            loss = model(**batch)
        loss.backward()
        step_peak = live.peak
    model.zero_grad(set_to_none=True)

    # the loss path alone, on hidden states [seq, 1, h] as the final norm leaves them
    hidden = torch.randn(seq, 1, cfg.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    labels, mask = batch["labels"].t(), batch["loss_mask"].t()
    with LiveBytes() as live:
        with autocast:
            if cfg.loss_chunk_size:
                loss = model.fused_loss_fn(
                    hidden, model.output_layer.weight, labels, mask, cfg.loss_chunk_size, vocab_size=vocab
                )
            else:
                loss = (model.loss_fn(model._mask_padding(model.output_layer(hidden)), labels) * mask).sum()
        loss.backward()
        loss_peak = live.peak
    weight_grad = model.output_layer.weight.numel() * 4

    # what the MLP saves for backward (weights and their bf16 casts excluded)
    mlp = model.layers[0].mlp
    weight_shapes = {tuple(p.shape) for p in mlp.parameters()}
    saved = {}

    def pack(t):
        if tuple(t.shape) not in weight_shapes and tuple(t.shape[::-1]) not in weight_shapes:
            saved[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    x = torch.randn(seq, 1, cfg.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        mlp(x)
    return dict(
        step_peak_gib=(params + step_peak) / GIB,
        params_gib=params / GIB,
        loss_path_peak_gib=loss_peak / GIB,
        loss_path_peak_without_weight_grad_gib=(loss_peak - weight_grad) / GIB,
        mlp_saved_gib=sum(saved.values()) / GIB,
    )


def memory_table(seqs):
    GPT.reset_parameters = lambda self, seed: None  # fake weights: nothing to draw
    rows = []
    for cp in (1, 4):
        for seq in seqs:
            for mode in MODES:
                t0 = time.perf_counter()
                with FakeTensorMode():
                    row = dict(
                        seq=seq, cp=cp, local_seq=seq // cp, mode=mode, **measure(LLAMA8B_LAYER, VOCAB, mode, seq // cp)
                    )
                row["fits_24gib"] = row["step_peak_gib"] <= MACHINE_GIB
                rows.append(row)
                print(
                    f"seq {seq:6d} cp {cp} {mode:24s} step {row['step_peak_gib']:6.2f} GiB"
                    f"{'' if row['fits_24gib'] else ' (over 24 GiB: accounted, never run)'}  "
                    f"loss path {row['loss_path_peak_gib']:6.2f} ({row['loss_path_peak_without_weight_grad_gib']:6.2f} "
                    f"w/o weight grad)  MLP saved {row['mlp_saved_gib']:5.2f}  [{time.perf_counter() - t0:.0f} s]",
                    flush=True,
                )
    return rows


def _validate_child(mode, seq):
    """One real run in a fresh process: accounted peak and ru_maxrss growth (KiB on Linux)."""
    torch.manual_seed(0)
    model, _ = build(SCALED, SCALED_VOCAB, mode, seq)
    batch = inputs(SCALED_VOCAB, seq)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with LiveBytes() as live:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch)
        loss.backward()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    with FakeTensorMode():
        fake_model, _ = build(SCALED, SCALED_VOCAB, mode, seq)
        fake_batch = inputs(SCALED_VOCAB, seq)
        with LiveBytes() as fake_live:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                fake_loss = fake_model(**fake_batch)
            fake_loss.backward()
    print(json.dumps(dict(real_gib=live.peak / GIB, fake_gib=fake_live.peak / GIB, rss_growth_gib=rss / 2**20)))


def validate(seq=4096):
    out = {}
    for mode in MODES:
        res = subprocess.run(
            [sys.executable, __file__, "--validate-child", mode, str(seq)], capture_output=True, text=True, check=True
        )
        out[mode] = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"validate seq {seq} {mode:24s} {out[mode]}", flush=True)
    return dict(seq=seq, shape="scaled (hidden 1024, vocab 32064)", modes=out)


def step_times(seq=2048, repeats=5):
    torch.manual_seed(0)
    models = {mode: build(SCALED, SCALED_VOCAB, mode, seq)[0] for mode in MODES}
    batch = inputs(SCALED_VOCAB, seq)
    best = {mode: float("inf") for mode in MODES}
    for r in range(repeats + 1):  # the first round warms up
        for mode, model in models.items():
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(**batch)
            loss.backward()
            model.zero_grad(set_to_none=True)
            if r:
                best[mode] = min(best[mode], time.perf_counter() - t0)
    base = best["plain"]
    out = {mode: dict(step_s=t, overhead=t / base - 1) for mode, t in best.items()}
    for mode, v in out.items():
        print(f"step time seq {seq} {mode:24s} {v['step_s']:.3f} s ({100 * v['overhead']:+.1f}%)", flush=True)
    return dict(
        seq=seq,
        shape="scaled (hidden 1024, SwiGLU 3584, GQA 8/2, vocab 32064)",
        threads=torch.get_num_threads(),
        modes=out,
    )


LLAMA3_8B = dict(params=8.03e9, layers=32, hidden=4096)
H100_BYTES, HOST_BYTES_PER_GPU = 80e9, 2e12 / 8  # a DGX H100 node: 8 x 80 GB, 2 TB of host memory
MARGIN_BYTES = 4e9  # CUDA context, library workspaces, allocator slack


def longest_sequence_estimate(rows):
    """Longest Llama-3-8B sequence with every technique on (tiled loss and MLP, full recompute,
    all layers but the last offloaded), from the per-token bytes measured here. An estimate, not
    a run: the one-layer working set stands for the layer being recomputed, the other layers hold
    nothing on the device but their offloaded input coming back."""
    mode = "fused loss + tiled MLP"
    a, b = sorted((r for r in rows if r["cp"] == 1 and r["mode"] == mode), key=lambda r: r["seq"])[-2:]
    per_token = (b["step_peak_gib"] - a["step_peak_gib"]) * GIB / (b["seq"] - a["seq"])  # one layer's working set
    # what does not grow with length (weight casts, a loss chunk, a tile), less the bench model's weights + grads
    fixed = max(0.0, a["step_peak_gib"] * GIB - 2 * a["params_gib"] * GIB - per_token * a["seq"])  # a fit: never credit
    m = LLAMA3_8B
    layer_input = m["hidden"] * 2  # bf16
    device_per_token = per_token + 2 * layer_input  # + the last layer's input and one coming back
    host_per_token = (m["layers"] - 1) * layer_input

    def tokens(static, gpus):
        by_device = (H100_BYTES - static - fixed - MARGIN_BYTES) / device_per_token
        by_host = HOST_BYTES_PER_GPU / host_per_token
        return int(min(by_device, by_host)) * gpus, "device" if by_device < by_host else "host"

    full_state = 16 * m["params"]  # fp32 weights, gradients, Adam m and v
    one_gpu, one_limit = tokens(2 * m["params"], 1)  # only bf16 weights on the GPU (ALST's offloaded setting)
    node, node_limit = tokens(full_state / 8, 8)  # CP=8 over the node, training state sharded 8 ways
    return dict(
        device_bytes_per_token=device_per_token,
        host_bytes_per_token=host_per_token,
        fixed_bytes=fixed,
        one_h100_fits_training_state=full_state + fixed + MARGIN_BYTES < H100_BYTES,
        one_h100_tokens_if_state_offloaded=one_gpu,
        one_h100_limited_by=one_limit,
        node_8xh100_tokens_cp8_state_sharded=node,
        node_limited_by=node_limit,
        assumptions="estimate: Llama-3-8B, bf16 autocast over fp32 weights, --loss-chunk-size 1024, --mlp-tile-size "
        "2048, full recompute, --cpu-offloading of 31 layers, 80 GB per GPU less 4 GB margin, 250 GB host "
        "memory per GPU; one H100: fp32 weights, gradients and Adam state (128 GB) do not fit, figure assumes "
        "only bf16 weights stay on the GPU (needs optimizer offload, not in megalite); node: CP=8 with the "
        "training state sharded 8 ways (needs FSDP, issue 14)",
    )


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    keys = [
        ("step_peak_gib", "peak per rank, one step"),
        ("loss_path_peak_gib", "loss path peak"),
        ("mlp_saved_gib", "MLP saved activations"),
    ]
    for ax, (key, title) in zip(axes, keys):
        for cp, style in ((1, "-"), (4, "--")):
            for mode in MODES:
                pts = [r for r in rows if r["cp"] == cp and r["mode"] == mode]
                ax.plot([r["seq"] for r in pts], [r[key] for r in pts], style, marker="o", label=f"{mode}, CP={cp}")
        if key == "step_peak_gib":
            ax.axhline(MACHINE_GIB, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("GiB")
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    fig.suptitle("One Llama-3-8B-shaped layer + 128k vocabulary, bf16 (accounted on fake tensors)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--validate-child":
        torch.set_num_threads(2)
        return _validate_child(sys.argv[2], int(sys.argv[3]))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    ap.add_argument("--time", action="store_true", help="also time one step per mode at a scaled shape")
    ap.add_argument("--validate", action="store_true", help="also check the accounting against real runs")
    ap.add_argument("--estimate-only", action="store_true", help="recompute the estimate from the saved table")
    a = ap.parse_args()
    path = os.path.join(RESULTS, "memory.json")
    results = json.load(open(path)) if os.path.exists(path) else {}
    if a.validate:
        results["validation"] = validate()
    if a.time:
        results["step_time"] = step_times()
    if not a.estimate_only:
        results["memory"] = memory_table(a.seq)
    results["longest_sequence_estimate"] = est = longest_sequence_estimate(results["memory"])
    print(json.dumps(est, indent=1))
    results["method"] = __doc__.split("Memory method: ")[1].split("\n\n")[0].replace("\n", " ")
    os.makedirs(RESULTS, exist_ok=True)
    with open(path, "w") as fh:
        json.dump(results, fh, indent=1)
    plot(results["memory"], os.path.join(RESULTS, "memory.png"))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
