"""File integrity: every rank file's size and CRC-32 go into meta.json and are checked before a load.

The checksum is computed on the bytes as torch.save hands them to the file, so saving never
reads a file back. CRC-32 because it is the fastest check the standard library offers
(zlib's, measured against blake2b, sha1 and md5) and it catches truncation and bit rot; it is
no defence against deliberate tampering. Checkpoints written before checksums existed carry
sizes only, and are checked by size.
"""

from __future__ import annotations

import os
import zlib

import torch.distributed as dist

from ...config import ConfigError

_CHUNK = 1 << 24


class ChecksumWriter:
    """A write-only stream over ``fh`` that keeps the CRC-32 and byte count of what it writes."""

    def __init__(self, fh):
        self.fh, self.crc32, self.size = fh, 0, 0
        self.error = None  # torch.save reports a failed write only as "unexpected pos"; this says why

    def write(self, data) -> int:
        try:
            n = self.fh.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise
        self.crc32 = zlib.crc32(data, self.crc32)
        self.size += memoryview(data).nbytes
        return n

    def flush(self) -> None:
        self.fh.flush()


def file_crc32(path: str) -> int:
    crc = 0
    with open(path, "rb", buffering=0) as fh:
        while chunk := fh.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def file_problem(ckpt_dir: str, name: str, meta: dict, checksum: bool) -> str | None:
    """What is wrong with rank file ``name`` of a checkpoint, or None. Size always; the CRC-32
    too when ``checksum`` and meta.json has one (reads the whole file)."""
    path, size = os.path.join(ckpt_dir, name), meta["files"][name]
    if not os.path.isfile(path):
        return f"{name} is missing"
    if os.path.getsize(path) != size:
        return f"{name} is truncated ({os.path.getsize(path)} of {size} bytes)"
    want = meta.get("crc32", {}).get(name)
    if checksum and want is not None:
        got = file_crc32(path)
        if got != want:
            return f"{name} is corrupted (CRC-32 {got:08x}, meta.json records {want:08x})"
    return None


def bad_files(ckpt_dir: str, meta: dict, names=None) -> list[str]:
    """The problems of rank files ``names`` (default: all), checksums included, read here."""
    found = (file_problem(ckpt_dir, n, meta, checksum=True) for n in sorted(meta["files"] if names is None else names))
    return [why for why in found if why]


def verify(ckpt_dir: str, meta: dict) -> str | None:
    """Collective over the world: each rank checksums every world-th file of the checkpoint, so the
    whole is read once however many ranks load it. Returns the problems found (the same on every
    rank), or None."""
    rank, world = dist.get_rank(), dist.get_world_size()
    found = [None] * world
    dist.all_gather_object(
        found, (ckpt_dir, bad_files(ckpt_dir, meta, sorted(meta["files"])[rank::world])), group=dist.group.WORLD
    )
    chosen = sorted({d for d, _ in found})
    if len(chosen) > 1:  # e.g. --load on each node's own disk
        raise ConfigError(
            f"ranks chose different checkpoints to load ({', '.join(chosen)}): --load must be a "
            "directory every rank sees with the same contents (a shared filesystem)"
        )
    problems = sorted(why for _, part in found for why in part)
    return "; ".join(problems) if problems else None
