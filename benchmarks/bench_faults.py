"""Fault matrix: run the tests of every row of tests/faults.py and write the "Faults tried" table.

A test belongs to a row by its ``@pytest.mark.fault("<row id>")``. The node ids come from
``pytest --collect-only -m fault`` (conftest.py's ``--fault-map`` says which row each is in); each
row's tests then run together in one pytest subprocess, ``repeats`` times (the row's default: 3
where a race is involved, else 1; ``--repeats N`` for every row). A run passes when none of its
tests fails, errors or is skipped. "observed" is what the tests recorded with
``record_property("observed", ...)`` (else "as expected"), or the first failure; "data lost" is
"none" only when every run passed, since the tests are what check that checkpoints and data
are intact.

    python benchmarks/bench_faults.py [--rows nonfinite bad-data] [--repeats N] [--update-readme]

Writes benchmarks/results/faults.json and faults.md and prints the table (with --rows, the saved
results of the rows not run are kept); --update-readme also replaces the table in README.md's
"Faults tried" section.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
README_START, README_END = "<!-- faults-table:start -->", "<!-- faults-table:end -->"
sys.path.insert(0, os.path.join(ROOT, "tests"))
from faults import ROWS  # noqa: E402 - the one table of row texts, shared with the tests


def _env() -> dict:
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, TRITON_INTERPRET="1", WANDB_MODE="disabled")


def _pytest(args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, check=False)


def collect(tmp: str) -> dict[str, list[str]]:
    """Row id -> node ids of the tests marked with it."""
    path = os.path.join(tmp, "fault-map.json")
    proc = _pytest(["--collect-only", "-q", "-m", "fault", "--fault-map", path])
    if proc.returncode not in (0, 5):  # 5: nothing collected
        raise SystemExit(f"collecting the fault tests failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    by_row: dict[str, list[str]] = {}
    with open(path) as fh:
        for node, rows in json.load(fh).items():
            for row in rows:
                by_row.setdefault(row, []).append(node)
    return by_row


def run_once(nodes: list[str], xml: str) -> dict:
    """One run of a row's tests: {"ok", "seconds", "observed": [...], "problem": str | None}."""
    start = time.perf_counter()
    proc = _pytest(["-q", "--junitxml", xml, *nodes])
    out = {"ok": False, "seconds": round(time.perf_counter() - start, 1), "observed": [], "problem": None}
    if not os.path.exists(xml):
        out["problem"] = f"pytest exited {proc.returncode} without a report: {(proc.stdout + proc.stderr)[-500:]}"
        return out
    cases = list(ET.parse(xml).getroot().iter("testcase"))
    for case in cases:
        name = case.get("name")
        for prop in case.iter("property"):
            if prop.get("name") == "observed" and prop.get("value") not in out["observed"]:
                out["observed"].append(prop.get("value"))
        bad = next((case.find(tag) for tag in ("failure", "error", "skipped") if case.find(tag) is not None), None)
        if bad is not None and out["problem"] is None:
            text = (bad.get("message") or bad.text or bad.tag).strip().splitlines()
            out["problem"] = f"{name}: {bad.tag}: {text[0][:300] if text else ''}"
    out["ok"] = bool(cases) and out["problem"] is None and proc.returncode == 0
    if out["problem"] is None and not out["ok"]:
        out["problem"] = f"pytest exited {proc.returncode}: {(proc.stdout + proc.stderr)[-300:]}"
    return out


def run_row(row_id: str, nodes: list[str], repeats: int, tmp: str) -> dict:
    row = ROWS[row_id]
    result = {"id": row_id, "fault": row["fault"], "expected": row["expected"], "tests": nodes}
    if not nodes:
        return dict(result, observed="not yet tested", passed=0, runs=0, data_lost="-", seconds=[])
    runs = [run_once(nodes, os.path.join(tmp, f"{row_id}-{i}.xml")) for i in range(repeats)]
    passed = sum(r["ok"] for r in runs)
    if passed == len(runs):
        observed = "; ".join(dict.fromkeys(o for r in runs for o in r["observed"])) or "as expected"
    else:
        observed = f"did not pass in {len(runs) - passed} of {len(runs)} runs: " + next(
            r["problem"] for r in runs if not r["ok"]
        )
    return dict(
        result,
        observed=observed,
        passed=passed,
        runs=len(runs),
        seconds=[r["seconds"] for r in runs],
        data_lost="none" if passed == len(runs) else "unknown: a run failed",
    )


def table(results: list[dict]) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| fault | expected outcome | observed | runs (passed/total) | data lost |", "|---|---|---|---|---|"]
    for r in results:
        runs = f"{r['passed']}/{r['runs']}" if r["runs"] else "-"
        lines.append(
            "| " + " | ".join(cell(x) for x in (r["fault"], r["expected"], r["observed"], runs, r["data_lost"])) + " |"
        )
    return "\n".join(lines) + "\n"


def update_readme(md: str) -> None:
    path = os.path.join(ROOT, "README.md")
    with open(path) as fh:
        text = fh.read()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise SystemExit(f"README.md has no {README_START} ... {README_END} block to replace")
    with open(path, "w") as fh:
        fh.write(text[: start + len(README_START)] + "\n" + md + text[end:])


def merged(results: list[dict]) -> list[dict]:
    """``results`` plus the saved rows that were not run this time (``--rows`` runs a subset), in table order."""
    saved = {}
    if os.path.exists(os.path.join(RESULTS, "faults.json")):
        with open(os.path.join(RESULTS, "faults.json")) as fh:
            saved = {r["id"]: r for r in json.load(fh)["rows"]}
    saved.update({r["id"]: r for r in results})
    return [saved[row_id] for row_id in ROWS if row_id in saved]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), help="rows to run (default: all)")
    ap.add_argument("--repeats", type=int, help="runs per row (default: the row's own, 3 where a race is involved)")
    ap.add_argument("--update-readme", action="store_true", help="also write the table into README.md")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        nodes = collect(tmp)
        results = []
        for row_id in args.rows:
            results.append(run_row(row_id, nodes.get(row_id, []), args.repeats or ROWS[row_id]["repeats"], tmp))
            r = results[-1]
            print(
                f"{row_id}: " + (f"{r['passed']}/{r['runs']} runs passed" if r["runs"] else "not yet tested"),
                flush=True,
            )
    results = merged(results)
    md = table(results)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "faults.json"), "w") as fh:
        json.dump({"python": sys.version.split()[0], "rows": results}, fh, indent=1)
    with open(os.path.join(RESULTS, "faults.md"), "w") as fh:
        fh.write(md)
    print(md)
    if args.update_readme:
        update_readme(md)


if __name__ == "__main__":
    main()
