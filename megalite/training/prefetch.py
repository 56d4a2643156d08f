"""The next step's batches, prepared by a background thread while this step computes.

``make(start)`` builds the micro-batches of the global batch that begins at sample ``start``
(gather, zigzag split, pin and, on CUDA, a non-blocking copy). After handing out the batches
for ``start`` the worker starts on ``start + stride``, which is what the loop asks for next, so
the order is exactly that of calling ``make`` in turn. On CUDA the copies run on a side stream;
the compute stream waits for them (an event) and the tensors are marked as used by it, so the
allocator does not recycle them early. An exception in the worker is raised by ``get`` in the
main thread, with the worker's traceback. The thread is a daemon blocked on a queue between
jobs, so even a run that dies without ``close()`` exits.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import torch


class Prefetcher:
    def __init__(self, make: Callable[[int], list], stride: int, device: torch.device, *, enabled: bool = True):
        self.make, self.stride, self.enabled, self.device = make, stride, enabled, device
        self.stream = torch.cuda.Stream(device) if enabled and device.type == "cuda" else None
        self.wait_s = 0.0  # time get() spent waiting for data, in total
        self._next: tuple[int, Future] | None = None
        self._jobs: queue.Queue = queue.Queue()
        self._thread = None
        if enabled:
            self._thread = threading.Thread(target=self._run, name="megalite-prefetch", daemon=True)
            self._thread.start()

    def _prepare(self, start: int):
        if self.stream is None:
            return self.make(start), None
        with torch.cuda.stream(self.stream):
            batches = self.make(start)
        return batches, self.stream.record_event()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            start, fut = job
            try:
                fut.set_result(self._prepare(start))
            except BaseException as exc:  # handed to the main thread by get()
                fut.set_exception(exc)

    def get(self, start: int) -> list:
        """The micro-batches of the global batch at ``start``; then starts on the next one."""
        t0 = time.perf_counter()
        if self._next is not None and self._next[0] == start:
            batches, ready = self._next[1].result()
        else:
            if self._next is not None:  # let the worker finish first: datasets are not thread-safe
                self._next[1].exception()
            batches, ready = self._prepare(start)
        self._next = None
        if ready is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(ready)
            for batch in batches:
                for v in batch.values():
                    if isinstance(v, torch.Tensor) and v.is_cuda:
                        v.record_stream(compute)
        self.wait_s += time.perf_counter() - t0
        if self.enabled:
            self._next = (start + self.stride, Future())
            self._jobs.put(self._next)
        return batches

    def close(self) -> None:
        """Stop the worker (after the job it is on, if any)."""
        self.enabled = False
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None
