"""Weighted blends of several datasets (Megatron's ``--data-path 0.7 A 0.3 B``).

Weights are normalised and quantised to multiples of 1/2**16. Each global batch of ``G``
samples takes from source ``s`` either floor or ceil of ``w_s * G`` samples: every source
gets the floor, and the ``G - sum(floor)`` leftover slots go to the sources most under-served
so far (largest ``w_s * G * t - given_s``, ties to the earlier source). So every global batch
tracks the weights within one sample, and the running totals stay within about one sample of
``w_s * samples`` (measured <= 1.09 over random blends). With the quantised weights the
under-service returns to exactly zero after at most 2**16 batches, so that period is computed
once (a few ms to ~0.3 s) and sample ``i`` is a pure function of ``i`` after it. Inside a batch,
a source's ``q`` samples sit at the quantiles ``(k + 0.5) / q`` so the sources interleave.

Source ``s`` serves its own samples 0, 1, 2, ... in blend order; a source that runs out goes on
into its next epoch (a GPTDataset accepts any index). A single prefix is not wrapped at all.
"""

from __future__ import annotations

import numpy as np

QUANTUM = 2**16  # weight resolution; also the longest period of the batch plan, in batches
_CACHE = 4  # within-batch orders kept


def parse_blend(words, flag: str = "--data-path") -> list[tuple[float, str]]:
    """``["0.7", "A", "0.3", "B"]`` -> [(0.7, "A"), (0.3, "B")] normalised; ``["A"]`` -> [(1.0, "A")]."""
    words = [words] if isinstance(words, str) else list(words)
    if len(words) == 1:
        return [(1.0, words[0])]
    usage = f"{flag} takes one PREFIX or WEIGHT PREFIX pairs, e.g. {flag} 0.7 data/web 0.3 data/code"
    if not words or len(words) % 2:
        raise ValueError(f"{flag} {' '.join(words)}: {usage}")
    pairs = []
    for w, prefix in zip(words[::2], words[1::2]):
        try:
            weight = float(w)
        except ValueError:
            raise ValueError(f"{flag}: {w!r} is not a weight; {usage}") from None
        if not weight >= 0 or weight == float("inf"):
            raise ValueError(f"{flag}: weight {w} of {prefix} must be a finite number >= 0")
        pairs.append((weight, prefix))
    total = sum(w for w, _ in pairs)
    if total <= 0:
        raise ValueError(f"{flag}: the weights sum to 0; give at least one source a positive weight")
    return [(w / total, p) for w, p in pairs]


def quantise(weights) -> np.ndarray:
    """Integer weights summing to QUANTUM, each within one quantum of ``w * QUANTUM`` (largest
    remainders; rounded first so that float noise never decides a tie: 0.6/0.3/0.1 == 6/3/1)."""
    exact = np.round(np.asarray(weights, dtype=np.float64) / np.sum(weights) * QUANTUM, 6)
    out = np.floor(exact).astype(np.int64)
    for s in np.argsort(-(exact - out), kind="stable")[: QUANTUM - int(out.sum())]:
        out[s] += 1
    return out


def batch_plan(units: np.ndarray, batch: int) -> np.ndarray:
    """Samples each source has given before batch t, for t in [0, period]: shape [period + 1, K].

    Exact integer arithmetic (plain Python: up to QUANTUM short rounds): ``owed[s]`` is
    QUANTUM x (w_s * batch * t - given_s)."""
    k = len(units)
    floor = [int(u) * batch // QUANTUM for u in units]
    gain = [int(u) * batch - QUANTUM * f for u, f in zip(units, floor)]  # owed grows by this per batch
    spare = batch - sum(floor)
    owed, given, rows = [0] * k, [0] * k, [[0] * k]
    while len(rows) <= QUANTUM:
        owed = [o + g for o, g in zip(owed, gain)]
        extra = sorted(range(k), key=lambda s: -owed[s])[:spare]  # stable: ties to the earlier source
        for s in extra:
            owed[s] -= QUANTUM
        given = [g + f + (s in extra) for s, (g, f) in enumerate(zip(given, floor))]
        rows.append(given)
        if not any(owed):
            break
    assert not any(owed), "blend plan did not return to balance within QUANTUM batches"
    return np.array(rows, dtype=np.int64)


class BlendedDataset:
    """Samples of ``datasets`` mixed by ``weights`` in global batches of ``batch`` samples."""

    def __init__(self, datasets, weights, batch: int, *, name: str = "blend"):
        if len(datasets) != len(weights) or not datasets:
            raise ValueError("BlendedDataset needs one weight per dataset, and at least one")
        if batch < 1:
            raise ValueError(f"batch must be >= 1 (got {batch})")
        self.datasets, self.batch, self.name = list(datasets), batch, name
        self.units = quantise(weights)
        self.weights = self.units / QUANTUM
        self._given = batch_plan(self.units, batch)
        self.period = len(self._given) - 1  # in batches
        self._orders: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)

    def check_nonempty(self) -> None:
        for d, u in zip(self.datasets, self.units):
            if u:
                d.check_nonempty()

    def _order(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, rank among that source's samples in the batch) of each slot of batch ``t``."""
        key = t % self.period
        if key not in self._orders:
            take = self._given[key + 1] - self._given[key]
            source = np.repeat(np.arange(len(take)), take)
            rank = np.concatenate([np.arange(q) for q in take])
            slot = np.lexsort((source, (rank + 0.5) / take[source]))
            self._orders[key] = (source[slot], rank[slot])
            if len(self._orders) > _CACHE:
                del self._orders[next(iter(self._orders))]
        return self._orders[key]

    def locate(self, i: int) -> tuple[int, int]:
        """(source, index within that source) of blended sample ``i``."""
        if i < 0:
            raise IndexError(f"sample index must be >= 0 (got {i})")
        t, j = divmod(int(i), self.batch)
        cycles, t_in = divmod(t, self.period)
        source, rank = self._order(t)
        s = int(source[j])
        return s, int(cycles * self._given[-1][s] + self._given[t_in][s] + rank[j])

    def __getitem__(self, i: int):
        s, k = self.locate(i)
        return self.datasets[s][k]


def blend_flags(data) -> dict[str, list[tuple[float, str]] | None]:
    """The train and valid blends a DataConfig asks for (None: that set comes from --data-path's split,
    or, for valid with --train-data-path alone, does not exist)."""
    if data.train_data_path or data.valid_data_path:
        return {
            "train": parse_blend(data.train_data_path, "--train-data-path") if data.train_data_path else None,
            "valid": parse_blend(data.valid_data_path, "--valid-data-path") if data.valid_data_path else None,
        }
    blend = parse_blend(data.data_path) if data.data_path else None
    return {"train": blend, "valid": blend}


def check_data_flags(cfg) -> str | None:
    """The problem with the data flags, as a message naming the fix (None: fine)."""
    d, t = cfg.data, cfg.train
    separate = d.train_data_path or d.valid_data_path
    if separate and d.data_path:
        return "--data-path cannot be combined with --train-data-path/--valid-data-path; use one or the other"
    if separate and not d.train_data_path:
        return "--valid-data-path needs --train-data-path (or use --data-path with --split)"
    if d.train_data_path and not d.valid_data_path and t.eval_iters > 0 and t.eval_interval:
        return (
            "--train-data-path without --valid-data-path leaves nothing to evaluate: "
            "add --valid-data-path, or --eval-iters 0"
        )
    if (d.data_path or d.train_data_path) and d.tokenizer_model is None:
        return "--data-path needs --tokenizer-model (the sentencepiece model it was built with)"
    try:
        blend_flags(d)
    except ValueError as exc:
        return str(exc)
    return None


def build_blends(data, default_prefix, seq_length, seed, eod, batch, *, tokenizer=None):
    """(train, valid) datasets for the data flags; ``default_prefix`` serves when no path is given."""
    from .gpt_dataset import build_datasets

    flags = blend_flags(data)
    if flags["train"] is None:
        flags = {"train": [(1.0, default_prefix)], "valid": [(1.0, default_prefix)]}
    separate = bool(data.train_data_path)
    split = "1,0,0" if separate else data.split
    built: dict[str, tuple] = {}

    def sets(prefix, which):
        # Train and valid never share a dataset object: the prefetch thread reads the train set
        # while evaluation reads the valid set, and datasets cache without locks.
        key = (prefix, which) if separate else prefix
        if key not in built:
            built[key] = build_datasets(prefix, split, seq_length, seed, eod, tokenizer=tokenizer)
        return built[key]

    out = []
    for which, pick in (("train", 0), ("valid", 0 if separate else 1)):
        blend = flags[which]
        if blend is None:
            out.append(None)
            continue
        parts = [sets(prefix, which)[pick] for _, prefix in blend]
        if len(parts) == 1:
            out.append(parts[0])
        else:
            desc = " + ".join(f"{w:.3g} x {p}" for w, p in blend)
            out.append(BlendedDataset(parts, [w for w, _ in blend], batch, name=f"the {which} blend {desc}"))
    return tuple(out)


def describe(data) -> dict | None:
    """What a checkpoint records of the data: the normalised blends (None: the default corpus)."""
    flags = blend_flags(data)
    if flags["train"] is None:
        return None
    return {k: [[round(w, 6), p] for w, p in v] if v else None for k, v in flags.items()} | {
        "split": None if data.train_data_path else data.split
    }


def blend_change(saved: dict | None, data) -> str | None:
    """A warning when resuming with a different blend than the checkpoint's (None: the same)."""
    now = describe(data)
    if saved == now:
        return None
    return (
        f"megalite: warning: the data blend differs from the checkpoint's (checkpoint {saved}, this run {now}): "
        "training continues at the saved sample count, but from a different mix of data"
    )
