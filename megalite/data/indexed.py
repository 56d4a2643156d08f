"""Memory-mapped token dataset: ``PREFIX.bin`` holds the tokens, ``PREFIX.idx`` where documents lie.

Format, version 2 (all little-endian)::

    PREFIX.bin   every document's tokens back to back, no header; dtype uint16 when the
                 vocabulary fits (vocab_size <= 65536), else int32
    PREFIX.idx   header, 64 bytes:
                   magic       8 bytes  b"MGLTIDX\\0"
                   version     uint64   2
                   dtype code  uint64   1 = uint16, 2 = int32 (the .bin token type)
                   vocab size  uint64   of the tokenizer that wrote the tokens
                   num_docs    uint64   N
                   num_tokens  uint64   T (the .bin holds exactly T tokens)
                   tokenizer   16 bytes fingerprint of that tokenizer's model (zeros: unknown)
                 offsets   int64[N]  token offset of each document's first token in .bin
                 sizes     int32[N]  tokens in each document

Version 1 is the same without the fingerprint (a 48-byte header) and is still read.
Offsets come before sizes so both arrays are naturally aligned. The builder writes both files
under temporary names and renames ``.bin`` first, then ``.idx``: a reader that finds the
``.idx`` finds a complete ``.bin`` beside it. The reader checks the header, the file sizes and
that the offsets tile the .bin exactly, and names the file and the fix on any mismatch.
"""

import array
import os
import shutil
import struct

import numpy as np

MAGIC = b"MGLTIDX\0"
VERSION = 2
HEADERS = {1: struct.Struct("<8sQQQQQ"), 2: struct.Struct("<8sQQQQQ16s")}  # by format version
_DTYPES = {1: np.dtype(np.uint16), 2: np.dtype(np.int32)}
_UNKNOWN = bytes(16)


def rebuild_hint(prefix: str, tokenizer_model: str = "TOKENIZER.model") -> str:
    return (
        f"rebuild it with: python -m megalite.data.preprocess --input FILES --tokenizer-model "
        f"{tokenizer_model} --output-prefix {prefix}"
    )


class DatasetFormatError(ValueError):
    """A .bin/.idx pair that is missing, empty or inconsistent."""


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest .bin token type that holds ids 0..vocab_size-1."""
    return _DTYPES[1] if vocab_size <= 2**16 else _DTYPES[2]


class IndexedDatasetBuilder:
    """Streams documents to ``PREFIX.bin``; ``finalize()`` writes ``PREFIX.idx`` and publishes both.

    Usable as a context manager: leaving the block without ``finalize()`` (an exception, say)
    removes the temporary files and publishes nothing. ``append=True`` starts from a copy of an
    existing PREFIX dataset (same tokenizer required), published the same way.
    """

    def __init__(self, prefix: str, vocab_size: int, tokenizer_fingerprint: bytes = _UNKNOWN, *, append: bool = False):
        if vocab_size < 1 or vocab_size > 2**31:
            raise ValueError(f"vocab_size must be in [1, 2**31] (got {vocab_size})")
        if len(tokenizer_fingerprint) != len(_UNKNOWN):
            raise ValueError(f"tokenizer_fingerprint must be {len(_UNKNOWN)} bytes (got {len(tokenizer_fingerprint)})")
        self.prefix, self.vocab_size, self.fingerprint = prefix, vocab_size, tokenizer_fingerprint
        self.dtype = token_dtype(vocab_size)
        parent = os.path.dirname(prefix)
        if parent:
            os.makedirs(parent, exist_ok=True)
        self._tmp = f".tmp-{os.getpid()}"
        self._sizes = array.array("i")  # int32, as in the .idx
        old = _existing(prefix, vocab_size, tokenizer_fingerprint) if append else None
        if old is not None:
            shutil.copyfile(prefix + ".bin", prefix + ".bin" + self._tmp)
            self._sizes.frombytes(np.ascontiguousarray(old.sizes).tobytes())
        self._bin = open(prefix + ".bin" + self._tmp, "ab" if old is not None else "wb")
        self._done = False

    @property
    def num_documents(self) -> int:
        return len(self._sizes)

    def add_document(self, ids) -> None:
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise ValueError(
                f"document {len(self._sizes)} has token ids outside [0, {self.vocab_size}): "
                f"min {arr.min()}, max {arr.max()}; is vocab_size the tokenizer's?"
            )
        if arr.size > np.iinfo(np.int32).max:
            raise ValueError(f"document {len(self._sizes)} has {arr.size} tokens; split it (max 2**31-1)")
        arr.astype(self.dtype).tofile(self._bin)
        self._sizes.append(arr.size)

    def add_documents(self, tokens: np.ndarray, sizes: np.ndarray) -> None:
        """Many documents at once: ``tokens`` back to back (already of this builder's dtype)."""
        if tokens.dtype != self.dtype or int(sizes.sum(dtype=np.int64)) != len(tokens):
            raise ValueError(f"add_documents needs {self.dtype} tokens whose count is the sum of the sizes")
        if len(tokens) and int(tokens.max()) >= self.vocab_size:
            raise ValueError(
                f"token ids outside [0, {self.vocab_size}): max {tokens.max()}; is vocab_size the tokenizer's?"
            )
        tokens.tofile(self._bin)
        self._sizes.frombytes(np.asarray(sizes, dtype=np.int32).tobytes())

    def finalize(self) -> None:
        if not self._sizes:
            self._cleanup()
            raise DatasetFormatError(f"no documents were added to {self.prefix}; nothing written")
        self._bin.close()
        sizes = np.frombuffer(self._sizes, dtype=np.int32)
        offsets = np.zeros(len(sizes), dtype=np.int64)
        np.cumsum(sizes[:-1], out=offsets[1:])
        code = 1 if self.dtype == _DTYPES[1] else 2
        with open(self.prefix + ".idx" + self._tmp, "wb") as f:
            f.write(
                HEADERS[VERSION].pack(
                    MAGIC, VERSION, code, self.vocab_size, len(sizes), int(sizes.sum(dtype=np.int64)), self.fingerprint
                )
            )
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


def _tiles(offsets: np.ndarray, sizes: np.ndarray, total: int, chunk: int = 2**20) -> bool:
    """Whether documents of ``sizes`` at ``offsets`` lie back to back from 0 to ``total``; in chunks,
    so that a 10M-document index needs no full-length temporaries."""
    end = 0
    for a in range(0, len(sizes), chunk):
        size = sizes[a : a + chunk]
        ends = end + np.cumsum(size, dtype=np.int64)
        if (size < 0).any() or offsets[a] != end or not np.array_equal(offsets[a + 1 : a + len(size)], ends[:-1]):
            return False
        end = int(ends[-1])
    return end == total


class IndexedDataset:
    """Read-only view of ``PREFIX.bin``/``.idx``; ``len()`` is the number of documents."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        idx_path, bin_path = prefix + ".idx", prefix + ".bin"
        rebuild = rebuild_hint(prefix)
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise DatasetFormatError(
                    f"dataset file {path} is missing; --data-path takes the prefix without .bin/.idx, or {rebuild}"
                )
        with open(idx_path, "rb") as f:
            head = f.read(max(h.size for h in HEADERS.values()))

        def truncated(need: int) -> DatasetFormatError:
            return DatasetFormatError(
                f"{idx_path} is truncated ({len(head)} bytes, its header needs {need}); {rebuild}"
            )

        if len(head) < 16:
            raise truncated(HEADERS[VERSION].size)
        magic, version = struct.unpack_from("<8sQ", head)
        if magic != MAGIC:
            raise DatasetFormatError(f"{idx_path} is not a megalite index (magic {magic!r}); {rebuild}")
        header = HEADERS.get(version)
        if header is None:
            raise DatasetFormatError(
                f"{idx_path} has format version {version}, this megalite reads "
                f"{' or '.join(map(str, HEADERS))}; {rebuild}"
            )
        if len(head) < header.size:
            raise truncated(header.size)
        _, _, code, self.vocab_size, n, total, *fingerprint = header.unpack_from(head)
        # What wrote the tokens, when the index says (format 2 and a known tokenizer), else None.
        self.tokenizer_fingerprint = fingerprint[0] if fingerprint and fingerprint[0] != _UNKNOWN else None
        if code not in _DTYPES:
            raise DatasetFormatError(f"{idx_path} has unknown token dtype code {code}; {rebuild}")
        if n == 0 or total == 0:
            raise DatasetFormatError(
                f"dataset {prefix} is empty ({n} documents, {total} tokens); preprocess non-empty input"
            )
        self.dtype = _DTYPES[code]
        expect = header.size + n * 12
        if os.path.getsize(idx_path) != expect:
            raise DatasetFormatError(
                f"{idx_path} is {os.path.getsize(idx_path)} bytes, its header implies "
                f"{expect}: truncated or corrupt; {rebuild}"
            )
        expect = total * self.dtype.itemsize
        if os.path.getsize(bin_path) != expect:
            raise DatasetFormatError(
                f"{bin_path} is {os.path.getsize(bin_path)} bytes but {idx_path} describes "
                f"{total} {self.dtype.name} tokens ({expect} bytes): truncated or from another "
                f"build; {rebuild}"
            )
        idx = np.memmap(idx_path, dtype=np.uint8, mode="r")
        self.offsets = idx[header.size : header.size + 8 * n].view(np.int64)
        self.sizes = idx[header.size + 8 * n :].view(np.int32)
        if not _tiles(self.offsets, self.sizes, total):
            raise DatasetFormatError(
                f"{idx_path} has document offsets/sizes that do not tile the {total} tokens "
                f"of {bin_path} (out-of-range or overlapping); {rebuild}"
            )
        self.tokens = np.memmap(bin_path, dtype=self.dtype, mode="r")
        self.num_tokens = int(total)

    def __len__(self) -> int:
        return len(self.sizes)

    # Pickle (DataLoader workers under spawn) by prefix, so the memmaps are reopened, not copied.
    def __getstate__(self) -> str:
        return self.prefix

    def __setstate__(self, prefix: str) -> None:
        self.__init__(prefix)

    def tokens_at(self, positions) -> np.ndarray:
        """The tokens at scattered ``positions`` of the .bin, read with pread: through the memmap each
        would map a whole fault-around block (64 KiB) into this process's resident memory."""
        size = self.dtype.itemsize
        fd = os.open(self.prefix + ".bin", os.O_RDONLY)
        try:
            raw = b"".join(os.pread(fd, size, int(p) * size) for p in positions)
        finally:
            os.close(fd)
        return np.frombuffer(raw, dtype=self.dtype)

    def doc(self, i: int) -> np.ndarray:
        """Tokens of document ``i`` (a read-only memmap slice)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"document {i} out of range for {len(self)} documents in {self.prefix}")
        start = int(self.offsets[i])
        return self.tokens[start : start + int(self.sizes[i])]


def _existing(prefix: str, vocab_size: int, fingerprint: bytes):
    """The dataset at ``prefix`` to append to (None when there is none), refused if another tokenizer wrote it."""
    if not os.path.exists(prefix + ".idx"):
        return None
    old = IndexedDataset(prefix)
    if old.vocab_size != vocab_size or (old.tokenizer_fingerprint or _UNKNOWN) != fingerprint:
        raise DatasetFormatError(
            f"--append: {prefix}.idx was written by another tokenizer (vocab {old.vocab_size}, fingerprint "
            f"{(old.tokenizer_fingerprint or _UNKNOWN).hex()}); append with that tokenizer, or write a new prefix"
        )
    return old


def check_tokenizer(ds: IndexedDataset, tokenizer) -> None:
    """Refuse a dataset written by another tokenizer than ``tokenizer`` (a data.tokenizer.Tokenizer)."""
    rebuild = rebuild_hint(ds.prefix, tokenizer.model_path)
    if ds.vocab_size != tokenizer.vocab_size:
        raise DatasetFormatError(
            f"{ds.prefix}.idx was written with a vocabulary of {ds.vocab_size} but the tokenizer "
            f"has {tokenizer.vocab_size} ({tokenizer.model_path}): the data was built with "
            f"another tokenizer; pass the --tokenizer-model used by preprocess, or {rebuild}"
        )
    if ds.tokenizer_fingerprint and tokenizer.fingerprint and ds.tokenizer_fingerprint != tokenizer.fingerprint:
        raise DatasetFormatError(
            f"{ds.prefix}.idx was written by another tokenizer than {tokenizer.model_path} "
            f"(fingerprint {ds.tokenizer_fingerprint.hex()}, this one "
            f"{tokenizer.fingerprint.hex()}); pass the --tokenizer-model used by "
            f"preprocess, or {rebuild}"
        )
