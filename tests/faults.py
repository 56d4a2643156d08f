"""The fault matrix of the README's "Faults tried" table, kept in this one place.

A test proves a row by carrying ``@pytest.mark.fault("<row id>")`` (conftest.py rejects ids not
listed here). ``benchmarks/bench_faults.py`` runs each row's tests ``repeats`` times and writes
the table; rows that race (kills, signals, locks) are repeated by default.
"""

ROWS = {
    "kill-mid-step": {
        "fault": "kill -9 of one rank mid-step, under `--max-restarts`",
        "expected": "all ranks restart and resume from the last complete checkpoint; the loss curve equals an "
        "uninterrupted run's",
        "repeats": 3,
    },
    "kill-mid-save": {
        "fault": "kill -9 of one rank in the middle of a checkpoint save",
        "expected": "the previous checkpoint stays intact and `--load` chooses it; the partial one is ignored "
        "with a warning",
        "repeats": 3,
    },
    "sigterm-save": {
        "fault": "SIGTERM to one rank with `--exit-signal-handler`",
        "expected": "every rank finishes the step, saves and exits 0",
        "repeats": 3,
    },
    "stopped-rank": {
        "fault": "one rank stopped (SIGSTOP)",
        "expected": "the others fail within `--distributed-timeout-minutes`, naming rank and operation",
        "repeats": 3,
    },
    "disk-full": {
        "fault": "disk full during a checkpoint save",
        "expected": "an error naming the path and the bytes needed; previous checkpoint and `latest` intact; "
        "non-zero exit on every rank, no hang",
        "repeats": 1,
    },
    "nonfinite": {
        "fault": "NaN/inf loss or gradient (an absurd `--lr`, or a non-finite gradient injected on one rank)",
        "expected": "every rank skips the update (weights and optimizer state bitwise unchanged) and logs it; "
        "after `--max-skipped-steps` consecutive skips the run stops naming the iteration; no "
        "checkpoint is written with non-finite values",
        "repeats": 1,
    },
    "corrupt-rank-file": {
        "fault": "a truncated or corrupted rank file in the newest checkpoint",
        "expected": "detected on load (sizes and checksums in meta.json); `--load DIR` falls back to the newest "
        "intact checkpoint with a warning naming the file; loading it directly is an error naming it",
        "repeats": 1,
    },
    "two-runs-same-save": {
        "fault": "two runs started on the same `--save` directory",
        "expected": "the second refuses at start-up (a lock held for the run's lifetime); a stale lock of a dead "
        "run is taken over",
        "repeats": 3,
    },
    "bad-data": {
        "fault": "truncated `.bin`, corrupted `.idx`, data built with another tokenizer",
        "expected": "an error naming the file and the preprocess command that rebuilds it, before any collective",
        "repeats": 1,
    },
    "bad-config": {
        "fault": "a `--config` file with an unknown key, a wrong type, or a value a flag rejects",
        "expected": "an error naming the key (and the file), before any collective",
        "repeats": 1,
    },
    "elastic-reshard": {
        "fault": "restart with a different world size after a failure",
        "expected": "the checkpoint is resharded on load; training continues with the same global batches",
        "repeats": 1,
    },
    "clean-exit-soak": {
        "fault": "many short runs in a row across layouts (the exit-time abort of issue 9)",
        "expected": "every run exits 0 with no `terminate called`; failing runs exit non-zero with their message",
        "repeats": 1,
    },  # the test itself launches many runs
}
