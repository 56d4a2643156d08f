"""LayerNorm / RMSNorm kernels on one GPU: megalite's Triton kernels vs torch native,
torch.compile of the native op, and apex's fused norms when apex is installed.

For each kind, dtype and hidden size it times forward and forward+backward (median of
triton.testing.do_bench, L2 flushed between reps) over ``--rows`` rows and reports the effective
bandwidth: the bytes a perfect kernel must move divided by the time
(forward: read x, write y; backward: read x and dy, write dx; with --residual also the second
input, the sum and its gradient). Device copy bandwidth (a large tensor copy) is measured first,
and the issue's targets are checked at hidden 4096 bf16: Triton forward+backward >= 1.3x torch
native and >= 80% of copy bandwidth. Each Triton result is checked against torch before timing.

    python benchmarks/bench_norm.py [--rows 16384] [--hidden 1024 2048 4096 8192 16384]
        [--dtypes bf16 fp32] [--kinds LayerNorm RMSNorm] [--residual] [--no-compile]

Writes benchmarks/results/norm_<gpu>.json. Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import torch

from megalite.ops.norm import fused_norm

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEVICE = "cuda"
TARGET_HIDDEN, TARGET_DTYPE, TARGET_SPEEDUP, TARGET_COPY_FRACTION = 4096, "bf16", 1.3, 0.8


def copy_bandwidth(do_bench, device) -> float:
    """GB/s of a 1 GiB device-to-device copy (read + write counted)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() / ms / 1e6


def available_impls(use_compile: bool) -> list[str]:
    impls = ["triton", "torch"]
    if use_compile:
        impls.append("compile")
    try:
        import apex.normalization.fused_layer_norm  # noqa: F401

        impls.append("apex")
    except ImportError:
        pass
    return impls


def make_fn(impl: str, kind: str, eps: float):
    """fn(x, w, b, r) -> output(s) for one implementation; torch.compile gets a fresh cache."""
    if impl != "compile":
        return lambda x, w, b, r: fused_norm(x, w, b, eps, r, kind=kind, impl=impl)
    torch._dynamo.reset()  # each case compiles afresh instead of hitting the recompile limit
    return torch.compile(lambda x, w, b, r: fused_norm(x, w, b, eps, r, kind=kind, impl="torch"))


def check_triton(kind, x, w, b, r, eps):
    """The compiled kernels are only tested in the interpreter in CI: compare with torch here."""
    with torch.no_grad():
        got = fused_norm(x, w, b, eps, r, kind=kind, impl="triton")
        want = fused_norm(
            x.float(),
            w.float(),
            None if b is None else b.float(),
            eps,
            None if r is None else r,
            kind=kind,
            impl="torch",
        )
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    for g, e in zip(got, want):
        torch.testing.assert_close(g.float(), e.to(g.dtype).float(), rtol=2e-2, atol=2e-2)


def bench_case(do_bench, impls, kind, dtype_name, hidden, rows, residual, eps=1e-5):
    dtype, device = DTYPES[dtype_name], DEVICE
    x = torch.randn(rows, hidden, device=device, dtype=dtype, requires_grad=True)
    r = torch.randn_like(x, requires_grad=True) if residual else None
    w = torch.rand(hidden, device=device, dtype=dtype, requires_grad=True)
    b = torch.randn(hidden, device=device, dtype=dtype, requires_grad=True) if kind == "LayerNorm" else None
    grads = [torch.randn_like(x) for _ in range(2 if residual else 1)]
    check_triton(kind, x, w, b, r, eps)
    leaves = [t for t in (x, r, w, b) if t is not None]
    row_bytes = rows * hidden * x.element_size()  # one [rows, hidden] tensor
    fwd_bytes = (4 if residual else 2) * row_bytes  # x (, r) in; y (, x + r) out
    bwd_bytes = (4 if residual else 3) * row_bytes  # x, dy (, dsum) in; dx out
    out = []
    for impl in impls:
        fn = make_fn(impl, kind, eps)

        def fwd():
            with torch.no_grad():
                fn(x, w, b, r)

        def fwd_bwd():
            y = fn(x, w, b, r)
            torch.autograd.backward(list(y) if residual else [y], grads)

        fwd()  # compile outside the timed region
        fwd_bwd()
        f_ms = do_bench(fwd, return_mode="median")
        fb_ms = do_bench(fwd_bwd, grad_to_none=leaves, return_mode="median")
        out.append(
            dict(
                kind=kind,
                dtype=dtype_name,
                hidden=hidden,
                rows=rows,
                residual=residual,
                impl=impl,
                fwd_ms=f_ms,
                fwd_gbps=fwd_bytes / f_ms / 1e6,
                fwd_bwd_ms=fb_ms,
                fwd_bwd_gbps=(fwd_bytes + bwd_bytes) / fb_ms / 1e6,
            )
        )
    return out


def check_targets(results, copy_gbps):
    """The issue's targets at hidden 4096 bf16, per kind (without residual)."""
    checks = []
    for kind in sorted({r["kind"] for r in results}):
        pick = {
            r["impl"]: r
            for r in results
            if r["kind"] == kind and r["hidden"] == TARGET_HIDDEN and r["dtype"] == TARGET_DTYPE and not r["residual"]
        }
        if "triton" not in pick:
            continue
        speedup = pick["torch"]["fwd_bwd_ms"] / pick["triton"]["fwd_bwd_ms"]
        fraction = pick["triton"]["fwd_bwd_gbps"] / copy_gbps
        checks.append(
            dict(
                kind=kind,
                speedup_vs_torch=speedup,
                speedup_target=TARGET_SPEEDUP,
                speedup_met=speedup >= TARGET_SPEEDUP,
                copy_fraction=fraction,
                copy_fraction_target=TARGET_COPY_FRACTION,
                copy_fraction_met=fraction >= TARGET_COPY_FRACTION,
            )
        )
    return checks


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=16384, help="rows (tokens) per call")
    p.add_argument("--hidden", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    p.add_argument("--kinds", nargs="+", default=["LayerNorm", "RMSNorm"], choices=["LayerNorm", "RMSNorm"])
    p.add_argument("--residual", action="store_true", help="also time the fused residual-add variant")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to compile)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/norm_<gpu>.json)")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_norm needs a CUDA GPU (the Triton kernels are only interpreted on CPU); nothing to do")
        return 0
    import triton
    from triton.testing import do_bench

    gpu = torch.cuda.get_device_name()
    copy_gbps = copy_bandwidth(do_bench, DEVICE)
    impls = available_impls(not a.no_compile)
    print(f"{gpu}  torch {torch.__version__}  triton {triton.__version__}  copy bandwidth {copy_gbps:.0f} GB/s")
    print(
        f"{'kind':9} {'dtype':5} {'hidden':>6} {'res':>3} {'impl':8} {'fwd ms':>8} {'GB/s':>6} "
        f"{'f+b ms':>8} {'GB/s':>6} {'vs torch':>8}"
    )
    results = []
    for kind in a.kinds:
        for dtype_name in a.dtypes:
            for hidden in a.hidden:
                for residual in [False, True] if a.residual else [False]:
                    case = bench_case(do_bench, impls, kind, dtype_name, hidden, a.rows, residual)
                    base = next(r for r in case if r["impl"] == "torch")["fwd_bwd_ms"]
                    for r in case:
                        print(
                            f"{kind:9} {dtype_name:5} {hidden:6d} {'yes' if residual else 'no':>3} {r['impl']:8} "
                            f"{r['fwd_ms']:8.3f} {r['fwd_gbps']:6.0f} {r['fwd_bwd_ms']:8.3f} "
                            f"{r['fwd_bwd_gbps']:6.0f} {base / r['fwd_bwd_ms']:7.2f}x"
                        )
                    results.extend(case)
    targets = check_targets(results, copy_gbps)
    for t in targets:
        print(
            f"target {t['kind']} h={TARGET_HIDDEN} {TARGET_DTYPE} fwd+bwd: {t['speedup_vs_torch']:.2f}x torch "
            f"(>= {TARGET_SPEEDUP}: {'met' if t['speedup_met'] else 'MISSED'}), "
            f"{100 * t['copy_fraction']:.0f}% of copy bandwidth "
            f"(>= {100 * TARGET_COPY_FRACTION:.0f}%: {'met' if t['copy_fraction_met'] else 'MISSED'})"
        )
    out = a.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)),
        "results",
        f"norm_{re.sub(r'[^A-Za-z0-9]+', '_', gpu).strip('_').lower()}.json",
    )
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(
            dict(
                gpu=gpu,
                torch=torch.__version__,
                triton=triton.__version__,
                rows=a.rows,
                copy_gbps=copy_gbps,
                impls=impls,
                results=results,
                targets=targets,
            ),
            f,
            indent=1,
        )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
