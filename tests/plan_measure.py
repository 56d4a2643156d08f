"""Measured tensor bytes on CPU for the planner's memory tests: a dispatch mode that tracks every
storage an op creates until it is freed, so saved activations (checkpoint inputs included) and
transient peaks are counted the way an allocator would count them."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key, n = st.data_ptr(), st.nbytes()
        if n == 0 or key in self.live:
            return
        self.live[key] = n
        self.now += n
        self.peak = max(self.peak, self.now)

        def freed(key=key, n=n):
            if self.live.pop(key, None) is not None:
                self.now -= n

        weakref.finalize(st, freed)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())
