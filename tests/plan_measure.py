"""Measured tensor bytes on CPU for the planner's memory tests (with megalite.plan.live_bytes,
which tracks every storage an op creates until it is freed)."""

from __future__ import annotations


def storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())
