"""GPT training samples: fixed-length windows over a shuffled stream of whole documents.

Every document in the .bin ends with the EOD token (``preprocess`` appends it), so packing is
concatenation: the stream of a split is its documents in a shuffled order, epoch after epoch,
each epoch with its own shuffle. Sample ``k`` of the stream is the ``seq_length + 1`` tokens at
``[k * seq_length, (k + 1) * seq_length + 1)``: consecutive samples share one boundary token,
so every token is predicted once. Samples are then shuffled in blocks of one epoch's worth
(``len(dataset)`` samples), so a batch mixes distant parts of the data.

``dataset[i]`` is a pure function of (data, split, seed, seq_length, i) and any ``i >= 0`` is
valid (later epochs), so a run resumes exactly from the number of samples it consumed. Nothing
is precomputed per token: each epoch's order and each block's sample order are drawn from a
numpy Generator seeded with (seed, kind, epoch) when first needed, and a window is gathered
with one vectorised ``searchsorted``.

Documents are split into train/valid/test as contiguous ranges in file order, sized by the
``--split`` weights (Megatron style). A split with no documents raises when it is used.
"""

import numpy as np
import torch

from .indexed import DatasetFormatError, IndexedDataset, check_tokenizer, rebuild_hint

_DOCS, _SAMPLES = 0, 1  # seed streams for document order and sample order
_CACHE = 4  # epochs / sample blocks kept; a window rarely spans more than two


def parse_split(split: str) -> list[float]:
    """``"969,30,1"`` (or ``"98/2"``) -> three non-negative weights, missing ones 0."""
    try:
        weights = [float(x) for x in split.replace("/", ",").split(",")]
    except ValueError:
        weights = []
    if not 1 <= len(weights) <= 3 or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(
            f"--split {split!r} must be 1-3 non-negative comma-separated weights "
            f"for train,valid,test with a positive sum, e.g. 969,30,1"
        )
    return weights + [0.0] * (3 - len(weights))


def split_bounds(num_docs: int, split: str) -> list[tuple[int, int]]:
    """Document ranges [start, end) of train, valid, test for ``num_docs`` documents."""
    cum = np.cumsum([0.0] + parse_split(split))
    edges = np.floor(cum / cum[-1] * num_docs + 0.5).astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


class GPTDataset(torch.utils.data.Dataset):
    """Samples from documents ``doc_ids`` of ``indexed``; ``len()`` is one epoch's worth of samples."""

    def __init__(
        self,
        indexed: IndexedDataset,
        doc_ids: np.ndarray,
        seq_length: int,
        seed: int,
        eod: int,
        *,
        name: str = "dataset",
        shuffle: bool = True,
    ):
        if seq_length < 1:
            raise ValueError(f"seq_length must be >= 1 (got {seq_length})")
        if seed < 0:
            raise ValueError(f"--seed must be >= 0 for the data order (got {seed})")
        self.indexed, self.seq_length, self.seed, self.name, self.shuffle = indexed, seq_length, seed, name, shuffle
        # int32 when the ids fit: half the memory for every per-epoch order of a 10M-document corpus
        # (numpy shuffles an int32 array exactly as the int64 one, so the order is unchanged).
        self.doc_ids = np.asarray(doc_ids, dtype=np.int32 if len(indexed) < 2**31 else np.int64)
        sizes = indexed.sizes[self.doc_ids]
        # A tokenizer mismatch shows on any document: probe at most 4096 evenly spread ones, so that
        # start-up does not fault in one page per document of a huge corpus on every rank.
        probe = np.unique(np.linspace(0, len(sizes) - 1, min(len(sizes), 4096)).astype(np.int64))
        ends = indexed.offsets[self.doc_ids[probe]] + sizes[probe] - 1
        bad = (
            np.concatenate([np.flatnonzero(sizes == 0), probe[indexed.tokens_at(np.maximum(ends, 0)) != eod]])
            if len(sizes)
            else probe
        )
        if bad.size:
            raise DatasetFormatError(
                f"document {self.doc_ids[bad[0]]} of {indexed.prefix}.bin does not end with "
                f"the EOD id {eod} (or is empty): the data was preprocessed with another tokenizer, "
                f"or without EOD; pass the --tokenizer-model used by preprocess, or "
                f"{rebuild_hint(indexed.prefix)}"
            )
        self.num_tokens = int(sizes.sum(dtype=np.int64))
        self.samples_per_epoch = max(1, self.num_tokens // seq_length) if self.num_tokens else 0
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._blocks: dict[int, np.ndarray] = {}

    @property
    def num_documents(self) -> int:
        return len(self.doc_ids)

    def __len__(self) -> int:
        return self.samples_per_epoch

    def check_nonempty(self) -> None:
        if not self.num_documents:
            raise ValueError(
                f"{self.name} has no documents; give the split a larger weight in --split "
                f"or use a dataset with more documents"
            )

    def _rng(self, kind: int, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, kind, index])

    def doc_order(self, epoch: int) -> np.ndarray:
        """Document ids in the order epoch ``epoch`` of the stream visits them."""
        if not self.shuffle:
            return self.doc_ids
        return self._rng(_DOCS, epoch).permutation(self.doc_ids)

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(end of each document within the epoch, document id), in visit order. Built in about a
        second for 10M documents and held for a few epochs (12 bytes per document each): cheaper
        than a cache on disk."""
        if epoch not in self._epochs:
            order = self.doc_order(epoch)
            self._epochs[epoch] = (np.cumsum(self.indexed.sizes[order], dtype=np.int64), order)
            if len(self._epochs) > _CACHE:
                del self._epochs[next(iter(self._epochs))]
        return self._epochs[epoch]

    def _stream_sample(self, i: int) -> int:
        block, j = divmod(i, self.samples_per_epoch)
        if not self.shuffle:
            return i
        if block not in self._blocks:
            self._blocks[block] = self._rng(_SAMPLES, block).permutation(self.samples_per_epoch)
            if len(self._blocks) > _CACHE:
                del self._blocks[next(iter(self._blocks))]
        return block * self.samples_per_epoch + int(self._blocks[block][j])

    def window(self, i: int) -> np.ndarray:
        """The ``seq_length + 1`` tokens (int64) of sample ``i``."""
        self.check_nonempty()
        if i < 0:
            raise IndexError(f"sample index must be >= 0 (got {i})")
        pos = self._stream_sample(int(i)) * self.seq_length + np.arange(self.seq_length + 1, dtype=np.int64)
        epochs = pos // self.num_tokens
        out = np.empty(self.seq_length + 1, dtype=np.int64)
        for epoch in range(int(epochs[0]), int(epochs[-1]) + 1):
            lo, hi = np.searchsorted(epochs, [epoch, epoch + 1])
            q = pos[lo:hi] - epoch * self.num_tokens  # positions within this epoch
            ends, order = self._epoch(epoch)
            doc = np.searchsorted(ends, q, side="right")
            ids = order[doc]  # .bin index = document offset + position within the document
            out[lo:hi] = self.indexed.tokens[self.indexed.offsets[ids] + q - (ends[doc] - self.indexed.sizes[ids])]
        return out

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        w = torch.from_numpy(self.window(i))
        s = self.seq_length
        return {
            "tokens": w[:-1].clone(),
            "labels": w[1:].clone(),
            "loss_mask": torch.ones(s, dtype=torch.float32),
            "position_ids": torch.arange(s, dtype=torch.int64),
        }


def build_datasets(
    data_path: str, split: str, seq_length: int, seed: int, tokenizer_eod: int, *, tokenizer=None, shuffle: bool = True
):
    """(train, valid, test) GPTDatasets over ``data_path`` (the PREFIX of PREFIX.bin/.idx); given the
    ``tokenizer``, data written by another one is refused."""
    indexed = IndexedDataset(data_path)
    if tokenizer is not None:
        check_tokenizer(indexed, tokenizer)
    out = []
    for name, (start, end) in zip(("train", "valid", "test"), split_bounds(len(indexed), split)):
        desc = f"the {name} split of {data_path} ({end - start} of {len(indexed)} documents, --split {split})"
        out.append(
            GPTDataset(indexed, np.arange(start, end), seq_length, seed, tokenizer_eod, name=desc, shuffle=shuffle)
        )
    return tuple(out)
