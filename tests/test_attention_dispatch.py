"""The one attention dispatcher, ops.attention.choose_backend: its decision table for every
(device, dtype, head dim, flash-attn installed / required, LSE needed), without a GPU. The
flash-attn probe is replaced, so the table does not depend on what this machine has."""

import pytest
import torch

from megalite import config as C
from megalite.config import ConfigError
from megalite.ops import attention
from megalite.parallel.parallelize import validate_layout

bf16, fp16, fp32, fp64 = torch.bfloat16, torch.float16, torch.float32, torch.float64

TABLE = [  # device, dtype, head dim, flash-attn installed, required (--use-flash-attn), need LSE -> kernel
    ("cpu", fp32, 64, False, False, True, "torch_cpu"),
    ("cpu", bf16, 64, True, False, True, "torch_cpu"),  # flash-attn has no CPU kernels
    ("cpu", fp64, 12, False, False, True, "torch_cpu"),
    ("cpu", bf16, 64, True, False, False, "sdpa"),
    ("cpu", fp32, 64, False, False, False, "sdpa"),
    ("cpu", fp32, 64, False, True, False, "flash_attn"),  # required means always (validation refuses CPU)
    ("cuda", bf16, 64, True, False, True, "flash_attn"),
    ("cuda", fp16, 64, True, False, False, "flash_attn"),
    ("cuda", bf16, 64, False, True, True, "flash_attn"),
    ("cuda", bf16, 64, False, True, False, "flash_attn"),
    ("cuda", fp32, 64, True, False, True, "math"),  # flash-attn and torch's flash kernel are half only
    ("cuda", fp32, 64, True, False, False, "sdpa"),
    ("cuda", fp64, 64, False, False, True, "math"),
    ("cuda", bf16, 64, False, False, True, "torch_cuda"),
    ("cuda", fp16, 256, False, False, True, "torch_cuda"),
    ("cuda", bf16, 12, False, False, True, "math"),  # not a multiple of 8
    ("cuda", bf16, 264, False, False, True, "math"),  # above 256
    ("cuda", bf16, 12, False, False, False, "sdpa"),
    ("cuda", bf16, 64, False, False, False, "sdpa"),
    # flash-attn installed, but a head dim its direct backward cannot run: the same rule as torch's kernel
    ("cuda", bf16, 264, True, False, True, "math"),
    ("cuda", bf16, 264, True, False, False, "sdpa"),
    ("cuda", fp16, 12, True, False, True, "math"),
    ("cuda", bf16, 12, True, False, False, "sdpa"),
    ("cuda", bf16, 256, True, False, True, "flash_attn"),
    ("cuda", bf16, 8, True, False, False, "flash_attn"),
]


@pytest.mark.parametrize("device, dtype, head_dim, installed, required, need_lse, want", TABLE)
def test_decision_table(monkeypatch, device, dtype, head_dim, installed, required, need_lse, want):
    monkeypatch.setattr(attention, "flash_attn_available", lambda: installed)
    got = attention.choose_backend(device, dtype, head_dim, require_flash_attn=required, need_lse=need_lse)
    assert got == want
    if need_lse and want in ("torch_cpu", "torch_cuda", "math"):  # "auto" block backends ask the same function
        assert attention.get_backend("auto", device, dtype, head_dim).name == want


def test_probe_runs_only_where_it_can_change_the_answer(monkeypatch):
    def probe():
        raise AssertionError("flash-attn probed for inputs it cannot take")

    monkeypatch.setattr(attention, "flash_attn_available", probe)
    for device, dtype, head_dim in [("cpu", bf16, 64), ("cpu", fp32, 64), ("cuda", fp32, 64), ("cuda", bf16, 264)]:
        attention.choose_backend(device, dtype, head_dim, need_lse=False)
        attention.choose_backend(device, dtype, head_dim, need_lse=True)
    q, k = torch.randn(2, 8, 4, 16), torch.randn(2, 8, 2, 16)  # the model's path on CPU never probes
    out = attention.causal_attention(q, k, k)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), k.transpose(1, 2), is_causal=True, enable_gqa=True
    )
    torch.testing.assert_close(out, want.transpose(1, 2))


def test_accumulator_and_fused_kernel_rules():
    assert [attention.accumulator_dtype(d) for d in (bf16, fp16, fp32, fp64)] == [fp32, fp32, fp32, fp64]
    fits = [
        (d, hd) for d in (bf16, fp16, fp32) for hd in (8, 12, 64, 80, 256, 264) if attention.fused_kernel_fits(d, hd)
    ]
    assert fits == [(d, hd) for d in (bf16, fp16) for hd in (8, 64, 80, 256)]


@pytest.mark.parametrize("head_dim, ok", [(64, True), (80, True), (12, False), (264, False)])
def test_cp_layout_on_cuda_uses_the_fused_kernel_rule(head_dim, ok):
    cfg = C.parse(["--device", "cuda", "--bf16", "--context-parallel-size", "2", "--kv-channels", str(head_dim)])
    if ok:
        validate_layout(cfg, 1, 2)
    else:
        with pytest.raises(ConfigError, match=f"head dim {head_dim}"):
            validate_layout(cfg, 1, 2)
