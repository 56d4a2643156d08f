import glob
import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from megalite import config as C
from megalite.model import GPT
from megalite.training.metrics import MetricsLogger, flops_per_token, format_line


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
    """Every matmul of a forward + backward, counted by torch, equals what TFLOP/s and MFU assume."""
    cfg = C.ModelConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, make_vocab_size_divisible_by=8, **kw
    )
    model = GPT(cfg, 50)
    batch, seq = 2, cfg.seq_length
    tokens = torch.randint(0, 50, (batch, seq))
    want = flops_per_token(cfg, model.num_params(matmul_only=True), seq) * batch * seq
    # The math SDPA backend runs attention as matmuls torch's counter sees (its CPU flash op is not counted).
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(tokens, torch.arange(seq).expand(batch, seq), tokens).sum().backward()
    assert counter.get_total_flops() == want
