import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("WANDB_MODE", "disabled")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    from pretrain_utils import build_corpus

    return build_corpus(tmp_path_factory)


def pytest_addoption(parser):
    parser.addoption(
        "--fault-map",
        metavar="FILE",
        help="write {node id: [fault rows]} of the collected tests to FILE (benchmarks/bench_faults.py)",
    )


@pytest.hookimpl(trylast=True)  # after -m/-k deselection
def pytest_collection_modifyitems(config, items):
    from faults import ROWS

    rows = {}
    for item in items:
        for mark in item.iter_markers("fault"):
            row = mark.args[0] if mark.args else None
            if row not in ROWS:
                raise pytest.UsageError(
                    f"{item.nodeid}: fault row {row!r} is not in tests/faults.py ({', '.join(ROWS)})"
                )
            rows.setdefault(item.nodeid, []).append(row)
    if config.getoption("--fault-map"):
        with open(config.getoption("--fault-map"), "w") as fh:
            json.dump(rows, fh, indent=1)
