import glob
import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from megalite import config as C
from megalite.model import GPT
from megalite.training.metrics import MetricsLogger, flops_per_token, format_line, peak_tflops


def record(i):
    return {
        "iteration": i,
        "train_iters": 10,
        "consumed_samples": 8 * i,
        "loss": 5.0 - i,
        "lr": 1e-3,
        "grad_norm": 1.5,
        "tokens_per_sec": 1234.0,
        "step_time": 0.25,
        "tflops_per_device": 0.5,
        "mfu": 0.25,
        "mem_gib": 1.0,
        "eta_s": 30.0,
    }


def test_jsonl_one_object_per_iteration_and_wandb_offline_without_key(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = C.parse(["--wandb-project", "megalite-test", "--wandb-exp-name", "t"])
    logger = MetricsLogger(str(tmp_path), cfg, {"a": 1})
    for i in (1, 2, 3):
        logger.log(record(i), line=i == 3)
    logger.close()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["iteration"] for r in rows] == [1, 2, 3] and rows[2]["loss"] == 2.0
    assert glob.glob(str(tmp_path / "wandb" / "offline-run-*")), "wandb must fall back to an offline run"
    out = capsys.readouterr().out
    assert out.count("lm loss:") == 1 and "lm loss: 2.000000E+00" in out and "MFU: 25.0%" in out


def test_console_line_without_mfu():
    line = format_line(dict(record(4), mfu=None, valid_loss=3.5))
    assert "MFU" not in line and "valid loss: 3.500000E+00" in line and "ETA: 00:00:30" in line


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(untie_embeddings_and_output_weights=True, position_embedding_type="learned_absolute"),
        dict(
            untie_embeddings_and_output_weights=True,
            swiglu=True,
            group_query_attention=True,
            num_query_groups=2,
            normalization="RMSNorm",
            add_bias_linear=False,
        ),
        dict(kv_channels=6, ffn_hidden_size=40),
    ],
    ids=["tied", "untied-learned-pos", "untied-swiglu-gqa", "odd-dims"],
)
def test_flops_per_token_equals_torch_flop_counter(kw):
    """Every matmul of a forward + backward, counted by torch, equals what TFLOP/s and MFU assume: the
    weight matmuls exactly, and the attention over the full square the math backend computes."""
    cfg = C.ModelConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, make_vocab_size_divisible_by=8, **kw
    )
    model = GPT(cfg, 50)
    batch, seq = 2, cfg.seq_length
    tokens = torch.randint(0, 50, (batch, seq))
    n_matmul = model.num_params(matmul_only=True)
    # The math SDPA backend runs attention as matmuls torch's counter sees (its CPU flash op is not counted):
    # batched ones (bmm) for attention, mm / addmm for the weights.
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(tokens, torch.arange(seq).expand(batch, seq), tokens).sum().backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert set(counts) <= {"aten.mm", "aten.addmm", "aten.bmm"}
    assert counts.get("aten.mm", 0) + counts.get("aten.addmm", 0) == 6 * n_matmul * batch * seq
    full = flops_per_token(cfg, n_matmul, seq, full_attention=True)
    assert counts["aten.bmm"] == (full - 6 * n_matmul) * batch * seq
    assert counter.get_total_flops() == full * batch * seq


def test_attention_flops_of_both_conventions():
    """Causal (the default) counts the half of the s x s score and context matmuls a causal kernel
    computes; the full-attention convention counts the whole square: 4 s d FLOPs forward, x3 with backward."""
    cfg = C.ModelConfig(num_layers=3, hidden_size=64, num_attention_heads=4, kv_channels=24, seq_length=8192)
    n, layers, width, s = 1000, 3, 4 * 24, 8192
    assert flops_per_token(cfg, n, s, full_attention=True) == 6 * n + 3 * layers * 4 * width * s
    assert flops_per_token(cfg, n, s) == 6 * n + 3 * layers * 4 * width * s / 2
    assert flops_per_token(cfg, 0, s, full_attention=True) == 2 * flops_per_token(cfg, 0, s)


@pytest.mark.parametrize(
    "name,peak,model",
    [
        ("NVIDIA H100 80GB HBM3", 989.0, "H100 SXM"),
        ("NVIDIA H100 PCIe", 756.0, "H100 PCIe"),
        ("NVIDIA H100 NVL", 835.0, "H100 NVL"),
        ("NVIDIA H200", 989.0, "H200 SXM"),
        ("NVIDIA H200 NVL", 835.0, "H200 NVL"),
        ("NVIDIA GH200 480GB", 989.0, "GH200"),
        ("NVIDIA A100-SXM4-80GB", 312.0, "A100"),
        ("NVIDIA A100 80GB PCIe", 312.0, "A100"),
        ("NVIDIA A10", 125.0, "A10"),
        ("NVIDIA A10G", 70.0, "A10G"),
        ("NVIDIA L40", 181.0, "L40"),
        ("NVIDIA L40S", 362.0, "L40S"),
    ],
)
def test_peak_is_looked_up_per_gpu_model(monkeypatch, name, peak, model):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: name)
    assert peak_tflops(torch.device("cuda", 0), None) == (peak, f"{peak:g} TFLOP/s ({model}, dense bf16)")


def test_peak_given_unknown_or_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla V100-SXM2-32GB")
    assert peak_tflops(torch.device("cuda", 0), None) == (None, "unknown for Tesla V100-SXM2-32GB; give --peak-tflops")
    assert peak_tflops(torch.device("cuda", 0), 400.0) == (400.0, "400 TFLOP/s from --peak-tflops")
    assert peak_tflops(torch.device("cpu"), None) == (None, "unknown on cpu")
