"""One run per --save directory: rank 0 holds ``<save>/.lock`` for the run's lifetime.

The lock is an flock, so the kernel drops it when the holding process dies however it dies:
a lock left by a killed run is free for the next run (an elastic restart of the same job
included: its workers are new processes). The file also records who holds it (pid and host),
for the error a second run gets and for the note when a run takes over from one that was killed.
"""

from __future__ import annotations

import fcntl
import os
import socket

import torch.distributed as dist

from ...config import ConfigError

LOCK_FILE = ".lock"


class SaveDirLock:
    def __init__(self, fh):
        self.fh = fh

    def release(self) -> None:
        """Idempotent. Empties the file (an empty lock file means its last holder ended cleanly)."""
        if self.fh is None:
            return
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.flush()
        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()
        self.fh = None


def _take(save_dir: str, log) -> tuple[SaveDirLock | None, str | None]:
    """(the lock, None), or (None, why not) when another live process holds it."""
    path = os.path.join(save_dir, LOCK_FILE)
    try:
        os.makedirs(save_dir, exist_ok=True)
        fh = open(path, "a+")  # noqa: SIM115 (held open for the run: the flock lives on this descriptor)
    except OSError as exc:
        return None, f"--save {save_dir}: cannot create {path} ({exc}); choose a directory this user can write"
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "a process that has not written its pid yet"
        fh.close()
        return None, (
            f"--save {save_dir} is in use by another run ({holder}, lock {path}); two runs saving "
            "into one directory would overwrite each other's checkpoints: wait for that run to end, "
            "or give this one another --save directory"
        )
    except OSError as exc:  # a filesystem without flock
        fh.close()
        log(f"megalite: warning: cannot lock {path} ({exc}): a second run saving into {save_dir} would not be detected")
        return None, None
    fh.seek(0)
    previous = fh.read().strip()
    if previous:
        log(f"megalite: {path}: taking over from a run that ended without releasing it ({previous})")
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    fh.flush()
    return SaveDirLock(fh), None


def lock_save_dir(save_dir: str, log=print) -> SaveDirLock | None:
    """Collective over the world: rank 0 takes the lock and tells every rank the verdict, so when
    another run holds it every rank raises the same ConfigError (none is left waiting). Returns the
    lock on rank 0, None on the others."""
    lock, why = _take(save_dir, log) if dist.get_rank() == 0 else (None, None)
    verdict = [why]
    dist.broadcast_object_list(verdict, src=0, group=dist.group.WORLD)
    if verdict[0]:
        raise ConfigError(verdict[0])
    return lock
