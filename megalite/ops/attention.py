"""Attention kernels and the one function that picks them (``choose_backend``).

Two kinds of callers: the model's whole-sequence causal attention (``causal_attention``, no
log-sum-exp needed), and context-parallel attention, built from blocks (one (q block, kv block)
attention returning (out, lse), and its backward) merged through their log-sum-exp.

Layout (all backends):
  q (B, Sq, H, D); k, v (B, Sk, G, D) with H % G == 0 (GQA: q head h reads kv head h // (H/G));
  out (B, Sq, H, D) in q's dtype; lse (B, H, Sq), natural log, float32 (float64 for float64 inputs).
``causal=True`` is the top-left aligned mask and requires Sq == Sk, so no query row is ever
fully masked (the CPU kernel would report lse = 0 for such a row instead of -inf).

``backward(dout, q, k, v, out, lse, ...)`` takes the FINAL out and lse of each query row (after
every block of the row was merged). Then P = exp(q k^T * scale - lse) is the row's true
probability restricted to this block, and the per-block gradients add up to the exact gradient.

Block backends:
  flash_attn  flash-attn 2.5-2.8's kernels (CUDA, fp16/bf16, head dim % 8 == 0, <= 256), used
              when the package imports;
  torch_cuda  torch's bundled flash kernel (CUDA, fp16/bf16, head dim % 8 == 0, <= 256);
  torch_cpu   torch's CPU flash kernel (fp32, bf16, fp64); GQA natively where the kernel has it;
  math        plain einsum reference in fp32/fp64 (tests; fp32 on CUDA). Materialises Sq x Sk.
The aten ops used here exist with these signatures in torch 2.4 through 2.13.
"""

from __future__ import annotations

import functools
import logging
import re

import torch
import torch.nn.functional as F

aten = torch.ops.aten
HALF = (torch.float16, torch.bfloat16)
log = logging.getLogger(__name__)


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """Partial outputs, log-sum-exps and gradient sums accumulate in fp32 (fp64 for fp64 inputs)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def fused_head_dim_ok(head_dim: int) -> bool:
    """The head dims both fused CUDA kernels run: torch's flash kernel, and flash-attn's backward
    called directly (flash_attn_func pads odd dims itself, its raw backward does not)."""
    return head_dim % 8 == 0 and head_dim <= 256


def fused_kernel_fits(dtype: torch.dtype, head_dim: int) -> bool:
    """The one eligibility rule for flash-attn and torch's CUDA flash kernel: fp16/bf16 inputs and
    ``fused_head_dim_ok``."""
    return dtype in HALF and fused_head_dim_ok(head_dim)


def _check(q, k, causal):
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} are not a multiple of kv heads {k.shape[2]}")
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(
            f"causal block attention needs Sq == Sk (got {q.shape[1]} and {k.shape[1]}); "
            "split the block into a causal square and a full rectangle"
        )


def _bhsd(*ts):
    """(B, S, H, D) -> (B, H, S, D) views, no copy."""
    return [t.transpose(1, 2) for t in ts]


class MathBackend:
    """Reference: scores materialised in fp32 (fp64 for fp64 inputs); autocast is switched off
    inside, or it would run the einsums in bf16."""

    name = "math"

    @staticmethod
    def _probs(q, k, lse, causal, scale):
        b, sq, h, d = q.shape
        g = k.shape[2]
        acc = accumulator_dtype(q.dtype)
        qg = q.to(acc).view(b, sq, g, h // g, d)  # (B, Sq, G, H/G, D)
        s = torch.einsum("bqgrd,bkgd->bgrqk", qg, k.to(acc)) * scale  # (B, G, H/G, Sq, Sk)
        if causal:
            s = s.masked_fill(torch.ones(sq, sq, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        if lse is None:
            lse = torch.logsumexp(s, dim=-1)  # (B, G, H/G, Sq)
        else:
            lse = lse.view(b, g, h // g, sq)
        return torch.exp(s - lse.unsqueeze(-1)), lse, qg

    def forward(self, q, k, v, causal, scale):
        _check(q, k, causal)
        with torch.autocast(q.device.type, enabled=False):
            return self._forward(q, k, v, causal, scale)

    def backward(self, dout, q, k, v, out, lse, causal, scale):
        with torch.autocast(q.device.type, enabled=False):
            return self._backward(dout, q, k, v, out, lse, causal, scale)

    def _forward(self, q, k, v, causal, scale):
        b, sq, h, d = q.shape
        p, lse, _ = self._probs(q, k, None, causal, scale)
        out = torch.einsum("bgrqk,bkgd->bqgrd", p, v.to(p.dtype)).reshape(b, sq, h, d)
        return out.to(q.dtype), lse.reshape(b, h, sq)

    def _backward(self, dout, q, k, v, out, lse, causal, scale):
        b, sq, h, d = q.shape
        g = k.shape[2]
        p, _, qg = self._probs(q, k, lse, causal, scale)
        do = dout.to(p.dtype).view(b, sq, g, h // g, d)
        delta = (do * out.to(p.dtype).view_as(do)).sum(-1).permute(0, 2, 3, 1)  # (B, G, H/G, Sq)
        vv, kk = v.to(p.dtype), k.to(p.dtype)
        dv = torch.einsum("bgrqk,bqgrd->bkgd", p, do)
        ds = p * (torch.einsum("bqgrd,bkgd->bgrqk", do, vv) - delta.unsqueeze(-1))
        dq = torch.einsum("bgrqk,bkgd->bqgrd", ds, kk).reshape(b, sq, h, d) * scale
        dk = torch.einsum("bgrqk,bqgrd->bkgd", ds, qg) * scale
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@functools.cache
def cpu_kernel_has_gqa() -> bool:
    """Whether torch's CPU flash kernel reads kv head h // (H/G) itself (added around torch 2.9;
    older kernels index kv heads by the query head). Probed once on a tiny input."""
    gen = torch.Generator().manual_seed(0)
    # kv: head 0 of a 2-head buffer, so a kernel that reads "kv head 1" stays in valid memory
    q, kv = torch.randn(1, 2, 4, 8, generator=gen), torch.randn(1, 2, 4, 8, generator=gen)[:, :1]
    try:
        out, _ = aten._scaled_dot_product_flash_attention_for_cpu(q, kv, kv, 0.0, False)
    except RuntimeError:
        return False
    want, _ = aten._scaled_dot_product_flash_attention_for_cpu(
        q, kv.expand(1, 2, 4, 8), kv.expand(1, 2, 4, 8), 0.0, False
    )
    return torch.allclose(out, want)


class TorchCPUBackend:
    """torch's CPU flash kernel, layout (B, H, S, D). Kernels without GQA get K/V repeated to H
    heads here, per block and locally (never on the wire), and dK/dV summed back per group."""

    name = "torch_cpu"

    def __init__(self, native_gqa: bool | None = None):
        self.native_gqa = cpu_kernel_has_gqa() if native_gqa is None else native_gqa

    def _kv(self, q, *kv):
        rep = q.shape[2] // kv[0].shape[2]
        return kv if rep == 1 or self.native_gqa else [t.repeat_interleave(rep, dim=2) for t in kv]

    def forward(self, q, k, v, causal, scale):
        _check(q, k, causal)
        k, v = self._kv(q, k, v)
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(*_bhsd(q, k, v), 0.0, causal, scale=scale)
        return out.transpose(1, 2), lse

    def backward(self, dout, q, k, v, out, lse, causal, scale):
        b, sk, g, d = k.shape
        ke, ve = self._kv(q, k, v)
        dq, dk, dv = (
            t.transpose(1, 2)
            for t in aten._scaled_dot_product_flash_attention_for_cpu_backward(
                *_bhsd(dout, q, ke, ve, out), lse, 0.0, causal, scale=scale
            )
        )
        if dk.shape[2] != g:  # sum the repeated heads back onto their kv head
            dk, dv = (t.reshape(b, sk, g, -1, d).sum(3) for t in (dk, dv))
        return dq, dk, dv


class TorchCUDABackend:
    """torch's bundled flash kernel (fp16/bf16), layout (B, H, S, D). With dropout 0 the kernel
    ignores the RNG state and the cumulative-length tensors (dense batch), so none is kept."""

    name = "torch_cuda"

    def forward(self, q, k, v, causal, scale):
        _check(q, k, causal)
        res = aten._scaled_dot_product_flash_attention(*_bhsd(q, k, v), 0.0, causal, False, scale=scale)
        return res[0].transpose(1, 2), res[1]

    def backward(self, dout, q, k, v, out, lse, causal, scale):
        rng = torch.empty(0, device=q.device)
        sq, sk = q.shape[1], k.shape[1]
        grads = aten._scaled_dot_product_flash_attention_backward(
            *_bhsd(dout, q, k, v, out), lse, None, None, sq, sk, 0.0, causal, rng, rng, scale=scale
        )
        return tuple(t.transpose(1, 2) for t in grads)


def flash_attn_backward_kwargs(version: tuple[int, int]) -> dict:
    """Keyword arguments of flash-attn's private ``_flash_attn_backward`` beyond the tensors,
    dropout, scale and causal flag, per release (no window, no softcap, no ALiBi). From 2.7 the
    function is a torch custom op whose Python signature reads (*args, **kwargs), so the
    parameters are listed per version here rather than read from it."""
    common = {"alibi_slopes": None, "deterministic": False, "rng_state": None}
    if version >= (2, 7):  # 2.7 and 2.8: the window split into two ints
        return {"window_size_left": -1, "window_size_right": -1, "softcap": 0.0, **common}
    if version >= (2, 6):
        return {"window_size": (-1, -1), "softcap": 0.0, **common}
    return {"window_size": (-1, -1), **common}  # 2.5


MIN_FLASH_ATTN = (2, 5)


def _import_flash_attn():
    """(flash_attn_func, _flash_attn_backward, (major, minor)); raises ImportError (or the
    OSError of a build that does not match the installed torch/CUDA) when unusable."""
    import flash_attn
    from flash_attn import flash_attn_func
    from flash_attn.flash_attn_interface import _flash_attn_backward

    found = re.match(r"(\d+)\.(\d+)", getattr(flash_attn, "__version__", ""))
    version = (int(found[1]), int(found[2])) if found else (0, 0)
    if not MIN_FLASH_ATTN <= version < (3, 0):
        raise ImportError(f"flash-attn {getattr(flash_attn, '__version__', '?')} found; megalite supports 2.5 to 2.8")
    return flash_attn_func, _flash_attn_backward, version


@functools.cache
def flash_attn_problem() -> str | None:
    """Why flash-attn cannot be used here, or None when it imports with what megalite calls."""
    try:
        _import_flash_attn()
    except (ImportError, OSError) as e:
        return f"{type(e).__name__}: {e}"
    return None


@functools.cache
def flash_attn_available() -> bool:
    """The one probe for the optional flash-attn package (tests replace it to cover both answers).
    Says once in the log when it falls back to torch's kernels."""
    problem = flash_attn_problem()
    if problem:
        log.warning("flash-attn not used (%s); attention runs on torch's kernels", problem)
    return problem is None


class FlashAttnBackend:
    """The flash-attn package (CUDA, fp16/bf16), layout (B, S, H, D) natively."""

    name = "flash_attn"

    def __init__(self):
        self._fwd, self._bwd, version = _import_flash_attn()
        self._bwd_kwargs = flash_attn_backward_kwargs(version)

    def forward(self, q, k, v, causal, scale):
        _check(q, k, causal)
        out, lse, _ = self._fwd(q, k, v, dropout_p=0.0, softmax_scale=scale, causal=causal, return_attn_probs=True)
        return out, lse

    def backward(self, dout, q, k, v, out, lse, causal, scale):
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        self._bwd(
            dout.contiguous(),
            q,
            k,
            v,
            out,
            lse,
            dq,
            dk,
            dv,
            dropout_p=0.0,
            softmax_scale=scale,
            causal=causal,
            **self._bwd_kwargs,
        )
        return dq, dk, dv


_BACKENDS = {
    "math": MathBackend,
    "torch_cpu": TorchCPUBackend,
    "torch_cuda": TorchCUDABackend,
    "flash_attn": FlashAttnBackend,
}


def choose_backend(
    device: torch.device | str,
    dtype: torch.dtype,
    head_dim: int,
    *,
    require_flash_attn: bool = False,
    need_lse: bool = True,
) -> str:
    """The one decision of which kernel computes attention.

    ``require_flash_attn`` (--use-flash-attn): always flash-attn; config validation has already
    refused the flag where flash-attn cannot run. Otherwise flash-attn when it imports and the
    inputs are CUDA and ``fused_kernel_fits``, and else, by ``need_lse`` (context-parallel blocks merge
    through their log-sum-exp, so they need kernels that return it):
      need_lse=False  "sdpa": torch's scaled_dot_product_attention, which picks its own kernel;
      need_lse=True   "torch_cpu" on CPU; on CUDA "torch_cuda" where ``fused_kernel_fits``,
                      else "math" (fp32 scores of the whole block).
    """
    device = torch.device(device)
    if require_flash_attn:
        return "flash_attn"
    # The probe only runs for inputs flash-attn could take: elsewhere it cannot change the choice.
    if device.type == "cuda" and fused_kernel_fits(dtype, head_dim) and flash_attn_available():
        return "flash_attn"
    if not need_lse:
        return "sdpa"
    if device.type != "cuda":
        return "torch_cpu"
    return "torch_cuda" if fused_kernel_fits(dtype, head_dim) else "math"


def get_backend(name: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, head_dim: int = 64):
    """A block backend by name; "auto" asks ``choose_backend``."""
    device = torch.device(device)
    half = dtype in HALF
    if name == "auto":
        name = choose_backend(device, dtype, head_dim)
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose auto or one of {sorted(_BACKENDS)}")
    if name == "flash_attn" and not flash_attn_available():
        raise RuntimeError(
            f"attention backend flash_attn requested but flash-attn cannot be used ({flash_attn_problem()}); "
            "pip install flash-attn 2.5-2.8 built for this torch, or use the torch kernels (--use-flash-attn off)"
        )
    if name in ("flash_attn", "torch_cuda") and (device.type != "cuda" or not half):
        raise ValueError(f"attention backend {name} needs CUDA fp16/bf16 tensors (got {device.type} {dtype})")
    if name in ("flash_attn", "torch_cuda") and not fused_head_dim_ok(head_dim):
        raise ValueError(
            f"attention backend {name} needs a head dim that is a multiple of 8 and <= 256 (got {head_dim})"
        )
    return _BACKENDS[name]()


class _BlockAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, backend):
        out, lse = backend.forward(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (causal, scale, backend)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        causal, scale, backend = ctx.args
        return (*backend.backward(dout, q, k, v, out, lse, causal, scale), None, None, None)


def block_attention(
    q, k, v, *, causal: bool = True, softmax_scale: float | None = None, backend="auto", document_ids=None
):
    """Differentiable single-block attention with a chosen backend: q (B, S, H, D),
    k/v (B, S, G, D) -> (B, S, H, D). Used where a rank holds the whole sequence (Ulysses).
    ``document_ids`` (B, S): attention stays inside each document (see doc_attention.py)."""
    if isinstance(backend, str):
        backend = get_backend(backend, q.device, q.dtype, q.shape[-1])
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    if document_ids is not None:
        from .doc_attention import planned_attention, whole_sequence_pairs  # imports this module

        return planned_attention(q, k, v, whole_sequence_pairs(document_ids, q, causal), scale, backend)
    return _BlockAttention.apply(q, k, v, causal, scale, backend)


def causal_attention(
    q, k, v, *, dropout_p: float = 0.0, require_flash_attn: bool = False, document_ids: torch.Tensor | None = None
):
    """Causal attention over a whole (local) sequence, the model's core attention:
    q (B, S, H, D), k/v (B, S, G, D) with H % G == 0 -> (B, S, H, D).
    ``document_ids`` (B, S) integers, non-decreasing along S: a query sees only earlier keys of
    its own document (packed samples); None attends across the whole sequence."""
    use_flash = (
        choose_backend(q.device, q.dtype, q.shape[-1], require_flash_attn=require_flash_attn, need_lse=False)
        == "flash_attn"
    )
    if document_ids is not None:
        from .doc_attention import document_causal_attention  # imports this module

        return document_causal_attention(q, k, v, document_ids, dropout_p=dropout_p, use_flash_attn=use_flash)
    if use_flash:
        from flash_attn import flash_attn_func  # (B, S, H, D) layout and GQA, as here

        return flash_attn_func(q, k, v, dropout_p=dropout_p, causal=True)
    q, k, v = _bhsd(q, k, v)
    out = F.scaled_dot_product_attention(
        q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=k.shape[1] != q.shape[1]
    )
    return out.transpose(1, 2)
