"""Memory-mapped token dataset: ``PREFIX.bin`` holds the tokens, ``PREFIX.idx`` where documents lie.

Format, version 1 (all little-endian)::

    PREFIX.bin   every document's tokens back to back, no header; dtype uint16 when the
                 vocabulary fits (vocab_size <= 65536), else int32
    PREFIX.idx   header, 48 bytes:
                   magic       8 bytes  b"MGLTIDX\\0"
                   version     uint64   1
                   dtype code  uint64   1 = uint16, 2 = int32 (the .bin token type)
                   vocab size  uint64   of the tokenizer that wrote the tokens
                   num_docs    uint64   N
                   num_tokens  uint64   T (the .bin holds exactly T tokens)
                 offsets   int64[N]  token offset of each document's first token in .bin
                 sizes     int32[N]  tokens in each document

Offsets come before sizes so both arrays are naturally aligned. The builder writes both files
under temporary names and renames ``.bin`` first, then ``.idx``: a reader that finds the
``.idx`` finds a complete ``.bin`` beside it. The reader checks the header, the file sizes and
that the offsets tile the .bin exactly, and names the file and the fix on any mismatch.
"""

import os
import struct

import numpy as np

MAGIC = b"MGLTIDX\0"
VERSION = 1
_HEADER = struct.Struct("<8sQQQQQ")
_DTYPES = {1: np.dtype(np.uint16), 2: np.dtype(np.int32)}
_REBUILD = "rebuild it with: python -m megalite.data.preprocess --input FILES --tokenizer-model M --output-prefix P"


class DatasetFormatError(ValueError):
    """A .bin/.idx pair that is missing, empty or inconsistent."""


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest .bin token type that holds ids 0..vocab_size-1."""
    return _DTYPES[1] if vocab_size <= 2**16 else _DTYPES[2]


class IndexedDatasetBuilder:
    """Streams documents to ``PREFIX.bin``; ``finalize()`` writes ``PREFIX.idx`` and publishes both.

    Usable as a context manager: leaving the block without ``finalize()`` (an exception, say)
    removes the temporary files and publishes nothing.
    """

    def __init__(self, prefix: str, vocab_size: int):
        if vocab_size < 1 or vocab_size > 2**31:
            raise ValueError(f"vocab_size must be in [1, 2**31] (got {vocab_size})")
        self.prefix, self.vocab_size = prefix, vocab_size
        self.dtype = token_dtype(vocab_size)
        parent = os.path.dirname(prefix)
        if parent:
            os.makedirs(parent, exist_ok=True)
        self._tmp = f".tmp-{os.getpid()}"
        self._bin = open(prefix + ".bin" + self._tmp, "wb")
        self._sizes: list[int] = []
        self._done = False

    def add_document(self, ids) -> None:
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise ValueError(f"document {len(self._sizes)} has token ids outside [0, {self.vocab_size}): "
                             f"min {arr.min()}, max {arr.max()}; is vocab_size the tokenizer's?")
        if arr.size > np.iinfo(np.int32).max:
            raise ValueError(f"document {len(self._sizes)} has {arr.size} tokens; split it (max 2**31-1)")
        arr.astype(self.dtype).tofile(self._bin)
        self._sizes.append(arr.size)

    def finalize(self) -> None:
        if not self._sizes:
            self._cleanup()
            raise DatasetFormatError(f"no documents were added to {self.prefix}; nothing written")
        self._bin.close()
        sizes = np.asarray(self._sizes, dtype=np.int32)
        offsets = np.zeros(len(sizes), dtype=np.int64)
        np.cumsum(sizes[:-1], out=offsets[1:])
        code = 1 if self.dtype == _DTYPES[1] else 2
        with open(self.prefix + ".idx" + self._tmp, "wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, code, self.vocab_size, len(sizes), int(sizes.sum(dtype=np.int64))))
            f.write(offsets.tobytes())
            f.write(sizes.tobytes())
        os.replace(self.prefix + ".bin" + self._tmp, self.prefix + ".bin")
        os.replace(self.prefix + ".idx" + self._tmp, self.prefix + ".idx")
        self._done = True

    def _cleanup(self) -> None:
        self._bin.close()
        for ext in (".bin", ".idx"):
            if os.path.exists(self.prefix + ext + self._tmp):
                os.remove(self.prefix + ext + self._tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if not self._done:
            self._cleanup()


class IndexedDataset:
    """Read-only view of ``PREFIX.bin``/``.idx``; ``len()`` is the number of documents."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        idx_path, bin_path = prefix + ".idx", prefix + ".bin"
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise DatasetFormatError(f"dataset file {path} is missing; --data-path takes the prefix "
                                         f"without .bin/.idx, or {_REBUILD}")
        with open(idx_path, "rb") as f:
            head = f.read(_HEADER.size)
        if len(head) < _HEADER.size:
            raise DatasetFormatError(f"{idx_path} is truncated ({len(head)} bytes, header needs {_HEADER.size}); {_REBUILD}")
        magic, version, code, self.vocab_size, n, total = _HEADER.unpack(head)
        if magic != MAGIC:
            raise DatasetFormatError(f"{idx_path} is not a megalite index (magic {magic!r}); {_REBUILD}")
        if version != VERSION:
            raise DatasetFormatError(f"{idx_path} has format version {version}, this megalite reads {VERSION}; {_REBUILD}")
        if code not in _DTYPES:
            raise DatasetFormatError(f"{idx_path} has unknown token dtype code {code}; {_REBUILD}")
        if n == 0 or total == 0:
            raise DatasetFormatError(f"dataset {prefix} is empty ({n} documents, {total} tokens); "
                                     f"preprocess non-empty input")
        self.dtype = _DTYPES[code]
        expect = _HEADER.size + n * 12
        if os.path.getsize(idx_path) != expect:
            raise DatasetFormatError(f"{idx_path} is {os.path.getsize(idx_path)} bytes, its header implies "
                                     f"{expect}: truncated or corrupt; {_REBUILD}")
        expect = total * self.dtype.itemsize
        if os.path.getsize(bin_path) != expect:
            raise DatasetFormatError(f"{bin_path} is {os.path.getsize(bin_path)} bytes but {idx_path} describes "
                                     f"{total} {self.dtype.name} tokens ({expect} bytes): truncated or from another "
                                     f"build; {_REBUILD}")
        idx = np.memmap(idx_path, dtype=np.uint8, mode="r")
        self.offsets = idx[_HEADER.size:_HEADER.size + 8 * n].view(np.int64)
        self.sizes = idx[_HEADER.size + 8 * n:].view(np.int32)
        ends = np.cumsum(self.sizes, dtype=np.int64)
        if (self.sizes < 0).any() or ends[-1] != total or self.offsets[0] != 0 \
                or not np.array_equal(self.offsets[1:], ends[:-1]):
            raise DatasetFormatError(f"{idx_path} has document offsets/sizes that do not tile the {total} tokens "
                                     f"of {bin_path} (out-of-range or overlapping); {_REBUILD}")
        self.tokens = np.memmap(bin_path, dtype=self.dtype, mode="r")
        self.num_tokens = int(total)

    def __len__(self) -> int:
        return len(self.sizes)

    # Pickle (DataLoader workers under spawn) by prefix, so the memmaps are reopened, not copied.
    def __getstate__(self) -> str:
        return self.prefix

    def __setstate__(self, prefix: str) -> None:
        self.__init__(prefix)

    def doc(self, i: int) -> np.ndarray:
        """Tokens of document ``i`` (a read-only memmap slice)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"document {i} out of range for {len(self)} documents in {self.prefix}")
        start = int(self.offsets[i])
        return self.tokens[start:start + int(self.sizes[i])]
