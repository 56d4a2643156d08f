"""Fused LayerNorm / RMSNorm in Triton: forward, backward, optional fused residual add.

Rows are the flattened leading dims of ``x`` ([..., N] -> [M, N]); each forward program owns one
row and keeps it in registers, or walks it in column chunks past ``FWD_ROW_IN_REGISTERS``
(backward: ``BWD_ROW_IN_REGISTERS``). Statistics (mean, 1/std) are computed and saved in fp32
whatever the input dtype; outputs are rounded once at the end.

Backward, with x_hat = (x - mean) * rstd (RMSNorm: x * rstd) and g = w * dy:
    LayerNorm  dx = rstd * (g - mean(g * x_hat) * x_hat - mean(g))
    RMSNorm    dx = rstd * (g - mean(g * x_hat) * x_hat)
    dw = sum_rows(dy * x_hat),  db = sum_rows(dy)
dw / db are reduced in two stages: each backward program walks a contiguous block of rows and
accumulates its own fp32 partial sum in registers, writes it to a [programs, N] buffer, and
torch sums that buffer over programs. No atomics, so results are deterministic.

Fused residual: ``norm(x + residual)`` also returns the sum (in the promoted dtype, as the
torch expression would), which the block carries on as its residual stream. The sum's gradient
is added to dx inside the backward kernel, and x and residual share that gradient.

Weight gradients are local to the rows this process saw; under sequence parallel the caller
sums them over the TP group (apply_tp's gradient hooks do).

On a machine without a GPU the kernels only run in Triton's interpreter, which must be switched
on with TRITON_INTERPRET=1 before triton is first imported (tests do this).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from megalite.ops.triton_norm_wide import norm_bwd_chunked, norm_fwd_chunked

MAX_HIDDEN = 65536  # the widest row tested (tests/test_norm.py)


@triton.jit
def _norm_fwd(
    x_ptr,  # [M, N] input
    res_ptr,  # [M, N] residual (only read when HAS_RESIDUAL)
    w_ptr,  # [N] weight
    b_ptr,  # [N] bias (only read when HAS_BIAS)
    y_ptr,  # [M, N] normalized output
    sum_ptr,  # [M, N] x + residual output (only written when HAS_RESIDUAL)
    mean_ptr,  # [M] fp32 row mean (LayerNorm only)
    rstd_ptr,  # [M] fp32 row 1/std
    N,
    eps,
    IS_RMS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    offs = row * N + cols
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        s = (x + tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + offs, s, mask=mask)
        x = s.to(tl.float32)  # normalize the rounded sum: it is what backward will see
    if IS_RMS:
        xc = x
    else:
        mean = tl.sum(x, axis=0) / N
        tl.store(mean_ptr + row, mean)
        xc = tl.where(mask, x - mean, 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=0) / N + eps)
    tl.store(rstd_ptr + row, rstd)
    y = xc * rstd * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd(
    dy_ptr,  # [M, N] gradient of the normalized output
    x_ptr,  # [M, N] the normalized input (the sum, with a residual)
    w_ptr,  # [N] weight
    mean_ptr,  # [M] fp32 (LayerNorm only)
    rstd_ptr,  # [M] fp32
    dsum_ptr,  # [M, N] gradient of the sum output (only read when HAS_DSUM)
    dx_ptr,  # [M, N] input gradient
    dw_ptr,  # [programs, N] fp32 per-program partial weight gradient
    db_ptr,  # [programs, N] fp32 per-program partial bias gradient (only when HAS_BIAS)
    M,
    N,
    rows_per_program,
    IS_RMS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DSUM: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    start = pid * rows_per_program
    end = tl.minimum(start + rows_per_program, M)
    for row in range(start, end):
        offs = row * N + cols
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        if IS_RMS:
            x_hat = x * rstd
        else:
            x_hat = tl.where(mask, (x - tl.load(mean_ptr + row)) * rstd, 0.0)
        g = w * dy
        c1 = tl.sum(g * x_hat, axis=0) / N
        if IS_RMS:
            dx = (g - c1 * x_hat) * rstd
        else:
            dx = (g - c1 * x_hat - tl.sum(g, axis=0) / N) * rstd
        if HAS_DSUM:
            dx += tl.load(dsum_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += dy * x_hat
        if HAS_BIAS:
            db += dy
    tl.store(dw_ptr + pid * N + cols, dw, mask=mask)
    if HAS_BIAS:
        tl.store(db_ptr + pid * N + cols, db, mask=mask)


# Register budget: an SM has 64K 32-bit registers, so a program of W warps gets at most
# 65536 / (32 * W) a thread. ptxas (sm_90, Triton 3.9; benchmarks/norm_registers.py) gives the
# one-pass backward ~16 registers a thread per row element held (eight fp32 values plus 64-bit
# addresses and masks): 252 at BLOCK_N 4096 / 8 warps, the whole file; at 8192 it spills. The
# forward needs about half and spills from 32768. Wider rows go to triton_norm_wide's kernels,
# which loop over CHUNK-column blocks. The backward keeps the one-pass kernel up to 8192 (a small
# spill, 184-252 B) until a GPU timing shows the chunked one faster there: common widths stay as measured.
FWD_ROW_IN_REGISTERS = 16384
BWD_ROW_IN_REGISTERS = 8192
CHUNK = 2048  # 8 warps, 8 values a thread: ~72 registers in the backward, no spills


INTERPRETED = not isinstance(_norm_fwd, JITFunction)  # TRITON_INTERPRET=1 was set before import


def _launch_config(n: int, row_in_registers: int) -> tuple[int, int, bool]:
    """(BLOCK_N, num_warps, chunked): a whole row in registers, spread to <= ~16 fp32 values a
    thread, while it is at most ``row_in_registers`` wide; else CHUNK columns, 8 a thread."""
    block = triton.next_power_of_2(n)
    if block > row_in_registers:
        return CHUNK, max(CHUNK // 256, 1), True
    return block, min(max(block // 512, 4), 32), False


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    n = x.shape[-1]
    if n > MAX_HIDDEN:
        raise ValueError(
            f"Triton norm kernels support hidden sizes up to {MAX_HIDDEN}, got {n}; "
            f"use --norm-impl torch for this model"
        )
    if weight.shape != (n,):
        raise ValueError(f"norm weight has shape {tuple(weight.shape)} but the input's last dim is {n}")
    if not x.is_cuda and not INTERPRETED:
        raise RuntimeError(
            f"the Triton norm kernels need CUDA tensors (got a {x.device.type} tensor); "
            f"use --norm-impl torch (or auto) on CPU, or set TRITON_INTERPRET=1 before "
            f"triton is imported to run them in Triton's interpreter"
        )


def _num_programs(rows: int, num_warps: int, device: torch.device) -> int:
    """Backward programs, each looping over a block of rows: about one resident wave, guessing
    that register use (~6 fp32 row slices a thread) fits 16 warps of these programs per SM."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return min(rows, sms * max(1, 16 // num_warps))
    return min(rows, 4)  # interpreter: a few programs so the partial-sum path is exercised


class NormFunction(torch.autograd.Function):
    """y = norm(x [+ residual]) over the last dim; returns y, or (y, x + residual) with a residual."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps: float, rms: bool):
        _check(x, weight)
        shape, n = x.shape, x.shape[-1]
        x2 = x.reshape(-1, n).contiguous()  # [M, N]
        m = x2.shape[0]
        has_res = residual is not None
        if has_res:
            if residual.shape != shape:
                raise ValueError(f"residual shape {tuple(residual.shape)} differs from input shape {tuple(shape)}")
            r2 = residual.reshape(-1, n).contiguous()
            s2 = torch.empty(m, n, device=x.device, dtype=torch.result_type(x, residual))
        else:
            r2 = s2 = x2  # placeholders, never touched
        y = torch.empty(m, n, device=x.device, dtype=s2.dtype)
        mean = torch.empty(m, device=x.device, dtype=torch.float32)
        rstd = torch.empty(m, device=x.device, dtype=torch.float32)
        block, warps, chunked = _launch_config(n, FWD_ROW_IN_REGISTERS)
        if m:
            (norm_fwd_chunked if chunked else _norm_fwd)[(m,)](
                x2,
                r2,
                weight,
                bias if bias is not None else weight,
                y,
                s2,
                mean,
                rstd,
                n,
                eps,
                IS_RMS=rms,
                HAS_BIAS=bias is not None,
                HAS_RESIDUAL=has_res,
                BLOCK_N=block,
                num_warps=warps,
            )
        ctx.save_for_backward(s2, weight, mean, rstd)
        ctx.shape, ctx.rms, ctx.has_bias, ctx.has_res = shape, rms, bias is not None, has_res
        ctx.set_materialize_grads(False)  # an unused sum output gives dsum = None: skip its load
        if has_res:
            return y.view(shape), s2.view(shape)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy, dsum=None):
        x2, weight, mean, rstd = ctx.saved_tensors
        m, n = x2.shape
        if dy is None:  # only the sum reached the loss
            dy = torch.zeros_like(x2)
        dy2 = dy.reshape(m, n).contiguous()
        has_dsum = dsum is not None
        dsum2 = dsum.reshape(m, n).contiguous() if has_dsum else dy2
        dx = torch.empty_like(x2)
        block, warps, chunked = _launch_config(n, BWD_ROW_IN_REGISTERS)
        programs = _num_programs(m, warps, x2.device)  # 0 when there are no rows
        # The one-pass kernel writes every program's whole partial row (zeros when its block is
        # empty): no memset; the chunked one accumulates into it.
        alloc = torch.zeros if chunked else torch.empty
        dw = alloc(programs, n, device=x2.device, dtype=torch.float32)
        db = alloc(programs, n, device=x2.device, dtype=torch.float32) if ctx.has_bias else dw
        if m:
            (norm_bwd_chunked if chunked else _norm_bwd)[(programs,)](
                dy2,
                x2,
                weight,
                mean,
                rstd,
                dsum2,
                dx,
                dw,
                db,
                m,
                n,
                triton.cdiv(m, programs),
                IS_RMS=ctx.rms,
                HAS_BIAS=ctx.has_bias,
                HAS_DSUM=has_dsum,
                BLOCK_N=block,
                num_warps=warps,
            )
        dweight = dw.sum(0).to(weight.dtype)
        dbias = db.sum(0).to(weight.dtype) if ctx.has_bias else None
        dx = dx.view(ctx.shape)
        return dx, dweight, dbias, (dx if ctx.has_res else None), None, None


def layer_norm(x, weight, bias, eps: float = 1e-5, residual=None):
    """LayerNorm over the last dim; with ``residual`` returns (norm(x + residual), x + residual)."""
    return NormFunction.apply(x, weight, bias, residual, eps, False)


def rms_norm(x, weight, eps: float = 1e-5, residual=None):
    """RMSNorm over the last dim; with ``residual`` returns (norm(x + residual), x + residual)."""
    return NormFunction.apply(x, weight, None, residual, eps, True)
