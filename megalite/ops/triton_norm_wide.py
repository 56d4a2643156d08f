"""Triton norm kernels for rows too wide to hold in registers (see triton_norm.py for the maths,
the arguments, and the register budget that picks these kernels).

Each program walks its row in BLOCK_N-column chunks, once per pass, and re-reads it from memory
(from L2 on a GPU) instead of keeping it live; only per-chunk vectors and row scalars stay in
registers.
"""

import triton
import triton.language as tl


@triton.jit
def norm_fwd_chunked(
    x_ptr,
    res_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    sum_ptr,
    mean_ptr,
    rstd_ptr,
    N,
    eps,
    IS_RMS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """triton_norm._norm_fwd in passes over column chunks: (sum and) mean, centred variance, normalize."""
    row = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = cols < N
        x = tl.load(x_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            s = (x + tl.load(res_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)).to(
                sum_ptr.dtype.element_ty
            )
            tl.store(sum_ptr + row * N + cols, s, mask=mask)  # later passes read it back (same thread)
            x = s.to(tl.float32)
        acc += x
    src_ptr = sum_ptr if HAS_RESIDUAL else x_ptr
    mean = 0.0
    if not IS_RMS:
        mean = tl.sum(acc, axis=0) / N
        tl.store(mean_ptr + row, mean)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):  # centred sum of squares: no cancellation at a large mean
        cols = start + tl.arange(0, BLOCK_N)
        mask = cols < N
        xc = tl.where(mask, tl.load(src_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32) - mean, 0.0)
        acc += xc * xc
    rstd = tl.rsqrt(tl.sum(acc, axis=0) / N + eps)
    tl.store(rstd_ptr + row, rstd)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = cols < N
        x = tl.load(src_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
        y = (x - mean) * rstd * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * N + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def norm_bwd_chunked(
    dy_ptr,
    x_ptr,
    w_ptr,
    mean_ptr,
    rstd_ptr,
    dsum_ptr,
    dx_ptr,
    dw_ptr,  # [programs, N] fp32, zeroed: each program accumulates into its own row of it
    db_ptr,
    M,
    N,
    rows_per_program,
    IS_RMS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DSUM: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """triton_norm._norm_bwd with each row in two passes over column chunks: the row sums of g * x_hat and g,
    then dx. The partial dw / db live in the program's row of the buffer, not in registers."""
    pid = tl.program_id(0).to(tl.int64)
    start_row = pid * rows_per_program
    for row in range(start_row, tl.minimum(start_row + rows_per_program, M)):
        rstd = tl.load(rstd_ptr + row)
        mean = 0.0 if IS_RMS else tl.load(mean_ptr + row)
        acc_gx = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc_g = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            x_hat = tl.where(
                mask, (tl.load(x_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32) - mean) * rstd, 0.0
            )
            g = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) * tl.load(
                dy_ptr + row * N + cols, mask=mask, other=0.0
            ).to(tl.float32)
            acc_gx += g * x_hat
            acc_g += g
        c1 = tl.sum(acc_gx, axis=0) / N
        c2 = 0.0 if IS_RMS else tl.sum(acc_g, axis=0) / N
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            x_hat = tl.where(
                mask, (tl.load(x_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32) - mean) * rstd, 0.0
            )
            dy = tl.load(dy_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
            dx = (tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) * dy - c1 * x_hat - c2) * rstd
            if HAS_DSUM:
                dx += tl.load(dsum_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_ptr + row * N + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            part = pid * N + cols
            tl.store(dw_ptr + part, tl.load(dw_ptr + part, mask=mask) + dy * x_hat, mask=mask)
            if HAS_BIAS:
                tl.store(db_ptr + part, tl.load(db_ptr + part, mask=mask) + dy, mask=mask)
