"""Norm kernels: the Triton kernels (run in Triton's interpreter on CPU) against torch, the
fused residual variant, --norm-impl selection and errors, and the model with each kernel.

Tolerances (rtol, atol) for Triton vs an fp32 torch reference computed from the same rounded
inputs, on outputs and gradients after rounding to the input dtype. Both sides accumulate in
fp32, so the budget is a rounding step of the output dtype; two for bfloat16, because Triton's
interpreter rounds fp32 -> bf16 toward zero (compiled kernels round to nearest).

    dtype      y, x + residual     dx, dresidual     dweight, dbias
    float32    1e-5, 1e-5          1e-5, 1e-5        1e-5, 1e-5
    float16    1e-3, 1e-3          1e-3, 1e-3        1e-3, 1e-3
    bfloat16   1.6e-2, 1e-2        1.6e-2, 1e-2      1.6e-2, 1e-2

Set TRITON_INTERPRET=0 on a GPU machine to run the same tests on compiled kernels (CUDA).
"""

import os
import subprocess
import sys
import types

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported, or it compiles for a GPU

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from multiproc import run_ranks  # noqa: E402

from megalite.config import ModelConfig  # noqa: E402
from megalite.model import GPT  # noqa: E402
from megalite.ops.norm import Norm, build_norm, fused_norm  # noqa: E402
from megalite.parallel.apply_tp import apply_tp  # noqa: E402

try:
    from megalite.ops import triton_norm as tn
except ImportError:
    tn = None

if tn is not None and tn.INTERPRETED:
    DEVICE, SKIP = "cpu", None
elif tn is not None and torch.cuda.is_available():
    DEVICE, SKIP = "cuda", None
else:
    DEVICE = "cpu"
    SKIP = (
        "triton is not installed (pip install triton)"
        if tn is None
        else "triton was imported without TRITON_INTERPRET=1 and there is no GPU"
    )
needs_triton = pytest.mark.skipif(SKIP is not None, reason=f"Triton norm kernels not tested: {SKIP}")

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1.6e-2, 1e-2)}
SHAPES = [(1, 1, 1023), (3, 7, 256), (5, 130)]
KINDS = ["LayerNorm", "RMSNorm"]


def reference(kind, x, weight, bias, eps, residual=None, sum_value=None):
    """Torch in fp32 on the given (already rounded) tensors; returns what Norm returns.
    ``sum_value`` replaces the value (not the gradient path) of x + residual: Triton's interpreter
    rounds fp32 -> bf16 toward zero, not to nearest, so its sum may sit one bf16 step away."""
    up = lambda t: None if t is None else t.float()  # noqa: E731
    if residual is not None:
        x = x + residual  # rounded to the promoted dtype, as the block's residual stream is
        if sum_value is not None:
            x = x + (sum_value - x).detach()
    x, weight, bias = up(x), up(weight), up(bias)
    n = x.shape[-1:]
    y = F.layer_norm(x, n, weight, bias, eps) if kind == "LayerNorm" else F.rms_norm(x, n, weight, eps)
    return y if residual is None else (y, x)


def make(shape, dtype, kind, seed=0, residual=False):
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    x = torch.randn(shape, generator=g) * 2 + 0.5  # a non-zero mean exercises LayerNorm's centring
    w = torch.rand(n, generator=g) + 0.5
    b = torch.randn(n, generator=g) if kind == "LayerNorm" else None
    r = torch.randn(shape, generator=g) if residual else None
    grads = [torch.randn(shape, generator=g) for _ in range(2)]
    cast = lambda t: None if t is None else t.to(DEVICE, dtype)  # noqa: E731
    return cast(x), cast(w), cast(b), cast(r), [cast(t) for t in grads]


def run(fn, leaves, grads):
    """Call fn on leaf copies, backprop the given output gradients; (outputs, leaf grads)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward([o for o in outs], [g.to(o.dtype) for o, g in zip(outs, grads)])
    return outs, [None if t is None else t.grad for t in leaves]


def assert_all_close(actual, expected, dtype):
    rtol, atol = TOL[dtype]
    for a, e in zip(actual, expected):
        assert (a is None) == (e is None)
        if a is not None:
            torch.testing.assert_close(a.float(), e.to(dtype).float(), rtol=rtol, atol=atol)


@needs_triton
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_triton_matches_torch(kind, shape, dtype, residual):
    check_against_torch(kind, shape, dtype, residual)


def check_against_torch(kind, shape, dtype, residual):
    """Outputs and input / weight gradients of the Triton kernel equal torch's."""
    x, w, b, r, grads = make(shape, dtype, kind, residual=residual)
    ours = lambda x, w, b, r: fused_norm(x, w, b, 1e-5, r, kind=kind, impl="triton")  # noqa: E731
    out, got = run(ours, [x, w, b, r], grads)
    if residual:
        torch.testing.assert_close(out[1], x + r, rtol=TOL[dtype][0], atol=0)  # within a rounding step
    ref = lambda x, w, b, r: reference(kind, x, w, b, 1e-5, r, out[1].detach() if r is not None else None)  # noqa: E731
    out_ref, want = run(ref, [x, w, b, r], grads)
    assert all(o.dtype == dtype for o in out)
    assert_all_close(out + tuple(got), out_ref + tuple(want), dtype)


@needs_triton
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(3, 32768), (2, 1, 65536)], ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_wide_rows_take_the_chunked_kernels(kind, shape, dtype, residual):
    for limit in (tn.FWD_ROW_IN_REGISTERS, tn.BWD_ROW_IN_REGISTERS):
        assert tn._launch_config(shape[-1], limit) == (tn.CHUNK, 8, True)
    check_against_torch(kind, shape, dtype, residual)


@needs_triton
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("shape", [(5, 1023), (2, 3, 256), (7, 300)], ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fwd_limit", [128, 1024], ids=["both-chunked", "bwd-chunked"])
def test_chunked_kernels_at_small_widths(monkeypatch, fwd_limit, kind, shape, dtype, residual):
    """Small thresholds and chunk force the chunked kernels onto a partial last chunk (1023, 300),
    an exact one (256), and more rows than backward programs (partial dw summed over rows); with
    fwd_limit 1024 the one-pass forward's statistics feed the chunked backward."""
    monkeypatch.setattr(tn, "FWD_ROW_IN_REGISTERS", fwd_limit)
    monkeypatch.setattr(tn, "BWD_ROW_IN_REGISTERS", 128)
    monkeypatch.setattr(tn, "CHUNK", 256)
    assert tn._launch_config(shape[-1], tn.BWD_ROW_IN_REGISTERS)[::2] == (256, True)
    assert tn._launch_config(shape[-1], fwd_limit)[2] == (fwd_limit == 128)
    check_against_torch(kind, shape, dtype, residual)


@needs_triton
@pytest.mark.parametrize("used", ["normed", "sum"])
def test_residual_variant_with_one_output_unused(used):
    """Only one of (normed, sum) reaches the loss: the other's gradient arrives as None."""
    x, w, b, r, (g, _) = make((2, 3, 96), torch.float32, "LayerNorm", residual=True)
    grads = {}
    for impl in ("triton", "torch"):
        leaves = [t.clone().requires_grad_() for t in (x, w, b, r)]
        normed, total = fused_norm(*leaves[:3], 1e-5, leaves[3], kind="LayerNorm", impl=impl)
        ((normed if used == "normed" else total) * g).sum().backward()
        grads[impl] = [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]
    assert_all_close(grads["triton"], grads["torch"], torch.float32)


@needs_triton
def test_residual_with_mixed_dtypes_promotes_like_torch():
    """bf16 branch output + fp32 residual stream (autocast): the sum and output are fp32."""
    x, w, b, r, grads = make((4, 3, 64), torch.float32, "RMSNorm", residual=True)
    x = x.bfloat16()
    ours = lambda x, w, r: fused_norm(x, w, None, 1e-6, r, kind="RMSNorm", impl="triton")  # noqa: E731
    ref = lambda x, w, r: reference("RMSNorm", x, w, None, 1e-6, r)  # noqa: E731
    out, got = run(ours, [x, w, r], grads)
    out_ref, want = run(ref, [x, w, r], grads)
    assert [o.dtype for o in out] == [torch.float32] * 2 and got[0].dtype == torch.bfloat16
    assert_all_close(out + tuple(got[1:]), out_ref + tuple(want[1:]), torch.float32)
    torch.testing.assert_close(got[0], want[0].bfloat16())


@needs_triton
@pytest.mark.parametrize("kind", KINDS)
def test_weight_grads_of_row_shards_sum_to_full(kind):
    """Sequence parallel: each rank sees a row shard; summing their dweight/dbias gives the full one."""
    x, w, b, _, (g, _) = make((10, 3, 80), torch.float32, kind)
    full = Norm(kind, 80, 1e-5, "triton").to(DEVICE)
    shards = [Norm(kind, 80, 1e-5, "triton").to(DEVICE) for _ in range(2)]
    (full(x) * g).sum().backward()
    for m, xs, gs in zip(shards, x.chunk(2), g.chunk(2)):
        (m(xs) * gs).sum().backward()
    for name, p in full.named_parameters():
        torch.testing.assert_close(sum(dict(m.named_parameters())[name].grad for m in shards), p.grad)


@needs_triton
@pytest.mark.parametrize("kind", KINDS)
def test_under_bf16_autocast(kind):
    """fp32 parameters, bf16 autocast: the kernel keeps the input dtype and gives fp32 weight grads."""
    x, w, b, _, (g, _) = make((2, 5, 128), torch.float32, kind)
    ref = Norm(kind, 128, 1e-5, "torch").to(DEVICE)
    ours = Norm(kind, 128, 1e-5, "triton").to(DEVICE)
    for xin, dtype in ((x, torch.float32), (x.bfloat16(), torch.bfloat16)):
        for m in (ref, ours):
            m.zero_grad()
        xa, xb = xin.clone().requires_grad_(), xin.clone().requires_grad_()
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            y = ours(xa)
        assert y.dtype == dtype
        (y.float() * g).sum().backward()  # y's gradient arrives rounded to y's dtype
        (ref(xb.float()) * g.to(dtype).float()).sum().backward()
        assert_all_close([y, xa.grad], [ref(xb.float()), xb.grad], dtype)
        for p, q in zip(ours.parameters(), ref.parameters()):
            assert p.grad.dtype == torch.float32
            torch.testing.assert_close(p.grad, q.grad, **dict(zip(("rtol", "atol"), TOL[dtype])))


@needs_triton
def test_empty_input_and_hidden_size_limit():
    m = Norm("LayerNorm", 64, impl="triton").to(DEVICE)
    x = torch.zeros(0, 64, device=DEVICE, requires_grad=True)
    m(x).sum().backward()
    assert x.grad.shape == (0, 64) and torch.equal(m.weight.grad, torch.zeros(64, device=DEVICE))
    big = Norm("RMSNorm", tn.MAX_HIDDEN + 1, impl="triton")
    with pytest.raises(ValueError, match="up to 65536"):
        big(torch.zeros(1, tn.MAX_HIDDEN + 1))


def test_auto_uses_torch_on_cpu(monkeypatch):
    import megalite.ops.norm as norm_mod

    m = build_norm("LayerNorm", 32, 1e-5, "auto")
    assert m.bias is not None
    monkeypatch.setattr(norm_mod, "_triton_norm", lambda required: pytest.fail("auto imported Triton on CPU"))
    x, w, b, r, _ = make((3, 32), torch.float32, "LayerNorm", residual=True)
    x, r = x.cpu(), r.cpu()
    y, s = m(x, r)
    torch.testing.assert_close(s, x + r)
    torch.testing.assert_close(y, F.layer_norm(x + r, (32,), m.weight, m.bias, 1e-5))


def test_bad_kind_and_impl():
    with pytest.raises(ValueError, match="LayerNorm or RMSNorm"):
        Norm("BatchNorm", 8)
    with pytest.raises(ValueError, match="auto, triton, apex, torch"):
        Norm("RMSNorm", 8, impl="cuda")


def test_apex_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "apex", None)  # makes `import apex...` raise ImportError
    with pytest.raises(RuntimeError, match="needs NVIDIA apex"):
        Norm("LayerNorm", 8, impl="apex")


@pytest.mark.parametrize("kind", KINDS)
def test_apex_path_calls_apex_with_its_signature(monkeypatch, kind):
    """apex cannot be installed here: a stand-in with apex's signatures checks the wiring."""
    fake = types.ModuleType("apex.normalization.fused_layer_norm")
    fake.fused_layer_norm_affine = lambda x, w, b, shape, eps: F.layer_norm(x, shape, w, b, eps)
    fake.fused_rms_norm_affine = lambda x, w, shape, eps: F.rms_norm(x, shape, w, eps)
    for name in ("apex", "apex.normalization"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    apex_norm, torch_norm = Norm(kind, 16, 1e-5, "apex"), Norm(kind, 16, 1e-5, "torch")
    x, _, _, r, _ = make((2, 16), torch.float32, kind, residual=True)
    for a, t in zip(apex_norm(x.cpu(), r.cpu()), torch_norm(x.cpu(), r.cpu())):
        torch.testing.assert_close(a, t)


@pytest.mark.skipif(tn is None, reason="triton is not installed (pip install triton)")
def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    code = (
        "import torch; from megalite.ops.norm import Norm\n"
        "try:\n    Norm('RMSNorm', 8, impl='triton')(torch.ones(2, 8))\n"
        "except RuntimeError as e:\n    print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "need CUDA tensors" in out.stdout and "TRITON_INTERPRET=1" in out.stdout, out.stdout + out.stderr


def tiny(kind, impl):
    return ModelConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        seq_length=16,
        normalization=kind,
        swiglu=kind == "RMSNorm",
        norm_impl=impl,
    )


@needs_triton
@pytest.mark.parametrize("kind", KINDS)
def test_model_with_triton_norms_equals_torch_norms(kind):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 100, (2, 17), generator=g)
    pos = torch.arange(16).expand(2, 16)
    losses, grads = {}, {}
    for impl in ("triton", "torch"):
        model = GPT(tiny(kind, impl), 100, seed=7).to(DEVICE)
        loss = model(tokens[:, :-1].to(DEVICE), pos.to(DEVICE), tokens[:, 1:].to(DEVICE)).mean()
        loss.backward()
        losses[impl] = loss.detach()
        grads[impl] = {n: p.grad for n, p in model.named_parameters()}
    torch.testing.assert_close(losses["triton"], losses["torch"])
    assert grads["triton"].keys() == grads["torch"].keys()
    for name, grad in grads["triton"].items():
        torch.testing.assert_close(grad, grads["torch"][name], rtol=1e-4, atol=1e-5, msg=name)


def _tp_sp_triton_vs_dense(rank, world):
    """TP + sequence parallel with Triton norms (each rank normalizes its sequence shard, the
    norm-weight gradients are summed over TP by apply_tp's hooks) equals one rank with torch norms."""
    tokens = torch.randint(0, 100, (2, 17), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(16).expand(2, 16)
    losses, norm_grads = [], []
    for impl, parallel in (("torch", False), ("triton", True)):
        model = GPT(tiny("RMSNorm", impl), 100, seed=7)
        if parallel:
            model = apply_tp(model, dist.group.WORLD, sequence_parallel=True)
        loss = model(tokens[:, :-1], pos, tokens[:, 1:]).mean()
        loss.backward()
        losses.append(loss.detach())
        norm_grads.append(
            {
                f"{mn}.{n}": p.grad
                for mn, m in model.named_modules()
                if isinstance(m, Norm)
                for n, p in m.named_parameters()
            }
        )
    torch.testing.assert_close(losses[1], losses[0])
    assert norm_grads[1].keys() == norm_grads[0].keys() and len(norm_grads[0]) == 5
    for name, grad in norm_grads[1].items():
        torch.testing.assert_close(grad, norm_grads[0][name], rtol=1e-4, atol=1e-5, msg=name)


@needs_triton
@pytest.mark.skipif(DEVICE != "cpu", reason="gloo ranks run the kernels in the interpreter")
def test_tensor_and_sequence_parallel_with_triton_norms(tmp_path):
    run_ranks(_tp_sp_triton_vs_dense, 2, tmp_path)
