"""The planner against published runs: every row's prediction and error.

Megatron-LM README weak scaling (H100, TFLOP/s per GPU) and Korthikanti et al. 2022 Table 5
(A100, seconds per iteration), predicted from the h100-sxm and a100-80gb presets as shipped
(no constant fitted to these rows; see megalite/plan/published.py for the assumptions).

    python benchmarks/plan_published.py

Writes benchmarks/results/plan_published.json; prints a markdown table (the README's).
"""

from __future__ import annotations

import json
import os
import statistics

from megalite.plan import hardware, published

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def main() -> None:
    h100, a100 = hardware.load("h100-sxm"), hardware.load("a100-80gb")
    rows = published.rows(h100, a100)
    print("| source | run | layout | published | predicted | error |")
    print("|---|---|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['source']} | {r['row']} | {r['layout']} | {r['published']:.2f} {r['unit']} | "
            f"{r['predicted']:.2f} | {100 * r['error']:+.1f}% |"
        )
    errors = [abs(r["error"]) for r in rows]
    summary = {"mae": statistics.mean(errors), "worst": max(errors), "fitted": {**h100.fitted, **a100.fitted}}
    print(f"\nmean absolute error {100 * summary['mae']:.1f}%, worst {100 * summary['worst']:.1f}% "
          f"(targets 10% / 20%); constants fitted to these rows: {summary['fitted'] or 'none'}")  # fmt: skip
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "plan_published.json"), "w") as fh:
        json.dump({"summary": summary, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
