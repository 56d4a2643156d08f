"""Published training runs the planner is checked against (tests/test_plan_published.py and
benchmarks/plan_published.py report every row's error).

Megatron-LM README, weak scaling on H100 (seq 4096, vocab 131,072, distributed optimizer, bf16,
overlapped DP / TP / PP communication, flash attention, micro batch 1), TFLOP/s per GPU in
Megatron's convention (full attention square). The README gives the model shapes only in an
image; the shapes below are reconstructed from the parameter counts (GPT, 4h MLP, untied
embeddings, head dim 128), so they are an assumption of this comparison. The README does not state
an interleaved schedule; 1F1B without interleaving is assumed.

Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models"),
Table 5 on A100-80GB: seconds per iteration, seq 2048, vocab 51,200, TP 8, micro batch 1,
DP 1, 2022 Megatron kernels (attention scores materialised), 1F1B without interleaving; "full"
is full recompute without SP, "selective" is selective recompute with SP.
"""

from __future__ import annotations

from ..config import ModelConfig
from .hardware import Hardware
from .search import predict
from .spec import Job, Layout


def _gpt(layers, hidden, heads, seq, vocab) -> ModelConfig:
    return ModelConfig(
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        seq_length=seq,
        vocab_size=vocab,
        position_embedding_type="learned_absolute",
        untie_embeddings_and_output_weights=True,
    )


# name, (layers, hidden, heads), tp, pp, gpus, global batch, published TFLOP/s per GPU
MEGATRON_WEAK_SCALING = [
    ("1.7B", (24, 2048, 16), 1, 1, 48, 192, 408.8),
    ("7.1B", (30, 4096, 32), 2, 1, 96, 192, 465.9),
    ("16B", (32, 6144, 48), 4, 1, 192, 192, 489.1),
    ("70B", (84, 8192, 64), 8, 2, 768, 384, 419.7),
    ("177B", (96, 12288, 96), 8, 6, 2304, 1152, 432.8),
    ("462B", (112, 18432, 144), 8, 16, 6144, 3072, 459.9),
]

# name, (layers, hidden, heads), pp, gpus, global batch, seconds: (full recompute, selective + SP)
KORTHIKANTI_TABLE5 = [
    ("22B", (48, 6144, 64), 1, 8, 4, (1.42, 1.10)),
    ("175B", (96, 12288, 96), 8, 64, 64, (18.13, 13.75)),
    ("530B", (105, 20480, 128), 35, 280, 280, (49.05, 37.83)),
    ("1T", (128, 25600, 160), 64, 512, 512, (94.42, 71.49)),
]


def rows(h100: Hardware, a100: Hardware) -> list[dict]:
    """Every published row with the planner's prediction and its relative error."""
    out = []
    for name, shape, tp, pp, gpus, batch, tflops in MEGATRON_WEAK_SCALING:
        job = Job(
            model=_gpt(*shape, 4096, 131072),
            vocab_size=131072,
            seq_length=4096,
            global_batch_size=batch,
            precision="bf16",
            sharding="optim",
            megatron=True,
            tp_overlap=True,
        )
        lay = Layout(tp=tp, pp=pp, dp=gpus // (tp * pp), sp=tp > 1)
        pred = predict(job, lay, h100, 8, full_square=True).tflops_per_gpu
        out.append(_row("Megatron-LM weak scaling", name, lay, "TFLOP/s/GPU", tflops, pred))
    for name, shape, pp, gpus, batch, seconds in KORTHIKANTI_TABLE5:
        for mode, published in zip(("full", "selective"), seconds):
            job = Job(
                model=_gpt(*shape, 2048, 51200),
                vocab_size=51200,
                seq_length=2048,
                global_batch_size=batch,
                precision="bf16",
                recompute=mode,
                megatron=True,
                flash_attention=False,
            )
            lay = Layout(tp=8, pp=pp, dp=gpus // (8 * pp), sp=mode == "selective")
            pred = predict(job, lay, a100, 8).step_time_s
            out.append(_row("Korthikanti et al. Table 5", f"{name} {mode}", lay, "s/iteration", published, pred))
    return out


def _row(source, name, lay, unit, published, predicted) -> dict:
    return {
        "source": source,
        "row": name,
        "layout": f"TP{lay.tp} PP{lay.pp} (v={lay.vpp}) DP{lay.dp}",
        "unit": unit,
        "published": published,
        "predicted": predicted,
        "error": predicted / published - 1,
    }
