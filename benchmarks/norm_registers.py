"""Registers and spills of the Triton norm kernels, compiled for a GPU without one (sm_90a).

Compiles each kernel the way NormFunction launches it (bf16 rows, fp32 statistics; with and
without the residual / its gradient) through Triton to PTX, then runs the ptxas bundled with
Triton with Triton's own flags plus -v, and reports registers a thread and spill-store bytes.
These are the figures behind FWD_ROW_IN_REGISTERS, BWD_ROW_IN_REGISTERS and CHUNK in
megalite/ops/triton_norm.py: a program of W warps may use at most 65536 / (32 W) registers a
thread, and past that ptxas spills to local memory.

    python benchmarks/norm_registers.py [--arch 90]

Runs on CPU (TRITON_INTERPRET must be unset). Writes benchmarks/results/norm_registers.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

BF16_ARGS = {"x_ptr", "res_ptr", "y_ptr", "sum_ptr", "dy_ptr", "dsum_ptr", "dx_ptr"}


def ptxas_usage(fn, block, warps, rms, extra_flag, arch):
    """(registers a thread, spill-store bytes) of one specialisation of a norm kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    names = list(fn.arg_names)
    consts = {"IS_RMS": rms, "HAS_BIAS": not rms, "BLOCK_N": block, extra_flag: True}
    consts.update({k: False for k in ("HAS_RESIDUAL", "HAS_DSUM") if k in names and k not in consts})
    sig = {}
    for n in names:
        if n in consts:
            sig[n] = "constexpr"
        elif n.endswith("_ptr"):
            sig[n] = "*bf16" if n in BF16_ARGS else "*fp32"
        else:
            sig[n] = "fp32" if n == "eps" else "i32"
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(kernel.asm["ptx"])
    cmd = [get_ptxas(arch).path, "-v", "--regAllocOptLevel=2", f"--gpu-name=sm_{arch}a", f.name, "-o", os.devnull]
    log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    os.remove(f.name)
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", log).group(1))
    return regs, spills


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100 / H200)")
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the kernels must be compiled, not interpreted")
        return 1
    from megalite.ops import triton_norm as tn

    # (name, kernel, residual flag, hidden, row_in_registers): one-pass at each width, then chunked
    cases = [("fwd", tn._norm_fwd, "HAS_RESIDUAL", n, n) for n in (4096, 8192, 16384, 32768, 65536)]
    cases += [("bwd", tn._norm_bwd, "HAS_DSUM", n, n) for n in (2048, 4096, 8192, 16384, 65536)]
    cases += [("fwd_chunked", tn.norm_fwd_chunked, "HAS_RESIDUAL", 65536, 0)]
    cases += [("bwd_chunked", tn.norm_bwd_chunked, "HAS_DSUM", 65536, 0)]
    print(f"sm_{a.arch}a  {'kernel':12} {'BLOCK_N':>7} {'warps':>5} {'kind':9} {'regs':>4} {'cap':>4} {'spill B':>7}")
    rows = []
    for name, fn, flag, n, limit in cases:
        block, warps, _ = tn._launch_config(n, limit)
        for rms in (False, True):
            regs, spills = ptxas_usage(fn, block, warps, rms, flag, a.arch)
            kind = "RMSNorm" if rms else "LayerNorm"
            cap = min(255, 65536 // (32 * warps))
            rows.append(
                dict(kernel=name, block_n=block, warps=warps, kind=kind, registers=regs, cap=cap, spill_bytes=spills)
            )
            print(f"sm_{a.arch}a  {name:12} {block:7d} {warps:5d} {kind:9} {regs:4d} {cap:4d} {spills:7d}")
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "norm_registers.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(dict(arch=a.arch, note="bf16 rows, with the residual / its gradient", results=rows), f, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
