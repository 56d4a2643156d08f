"""Tensor bytes as an allocator would count them, on CPU or on fake tensors: a dispatch mode that
adds each storage an op creates when it appears and subtracts it when the storage is freed. The
planner's memory tests and benchmarks/bench_memory.py measure with it. Storages are told apart by
identity, not data pointer, so fake tensors (FakeTensorMode: shapes, no data, pointer 0) count
too."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """``now``: bytes of the storages created under this mode and still alive; ``peak``: their
    most at once."""

    def __init__(self):
        super().__init__()
        self._sizes, self.now, self.peak = {}, 0, 0

    def ignore(self, tensors) -> None:
        """Storages that existed before (weights): never counted, even when an op returns them."""
        for t in tensors:
            self._sizes[t.untyped_storage()._cdata] = 0

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key, n = st._cdata, st.nbytes()
        if key in self._sizes:
            return
        self._sizes[key] = n
        self.now += n
        self.peak = max(self.peak, self.now)
        weakref.finalize(st, self._free, key)

    def _free(self, key) -> None:
        self.now -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out
