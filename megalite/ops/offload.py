"""Activation offload for full recompute (Megatron's --cpu-offloading, --cpu-offloading-num-layers).

Full recompute keeps one tensor per layer, the layer's input [s, b, h], on the device from the
forward pass until that layer's backward. With offload, the first N layers' inputs go to pinned
host memory instead: the device-to-host copy starts on a side stream as the layer's forward is
queued (so it overlaps the compute), and in backward, when layer i is recomputed, the input of the
next offloaded layer (i-1, the next one backward needs) is already being copied back. Only the
last layers, whose backward comes first, keep their inputs on the device.

The copies are behind a small interface (``to_host``, ``to_device``, ``wait``) so that the
schedule is tested on CPU with a stand-in mover; ``CudaMover`` is the real one. On CPU host and
device memory are the same and offload is refused (``validate_offload``).

``offloaded_checkpoint`` is a re-entrant checkpoint: forward without a graph, backward recomputes
the layer from the fetched input (same RNG and autocast state) and backpropagates through it.
"""

from __future__ import annotations

import torch

from ..config import ConfigError, ModelConfig


def validate_offload(m: ModelConfig, on_cuda: bool) -> None:
    """--cpu-offloading only means something where device and host memory differ."""
    if m.cpu_offloading and not on_cuda:
        raise ConfigError(
            "--cpu-offloading moves activations from GPU to host memory; on CPU they already are in host "
            "memory: drop the flag (or run on CUDA)"
        )


def offloaded_layers(m: ModelConfig) -> range:
    """The layers whose recompute inputs are offloaded: the first --cpu-offloading-num-layers,
    by default all but the last (its backward comes first: nothing to overlap the copy with)."""
    n = m.cpu_offloading_num_layers
    return range(m.num_layers - 1 if n is None else n)


class CudaMover:
    """Pinned host copies on one side stream; the H2D copy of a tensor queues behind its D2H copy."""

    def __init__(self):
        self.stream = None

    def _side(self, device):
        if self.stream is None:
            self.stream = torch.cuda.Stream(device)
        return self.stream

    def to_host(self, key, x):
        stream = self._side(x.device)
        stream.wait_stream(torch.cuda.current_stream(x.device))  # x is produced
        with torch.cuda.stream(stream):
            host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            host.copy_(x, non_blocking=True)
        x.record_stream(stream)  # x's memory is not reused before the copy has read it
        return host, x.device

    def to_device(self, key, handle):
        host, device = handle
        stream = self._side(device)
        with torch.cuda.stream(stream):
            x = host.to(device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(stream)
        return x, ready

    def wait(self, key, handle):
        x, ready = handle
        current = torch.cuda.current_stream(x.device)
        current.wait_event(ready)
        x.record_stream(current)
        return x


class Offloader:
    """Which layers are offloaded and where each one's input is: on the host, or coming back."""

    def __init__(self, layers, mover):
        self.layers = frozenset(layers)
        self.mover = mover
        self._host, self._coming = {}, {}

    def save(self, i: int, x: torch.Tensor) -> None:
        self._host[i] = self.mover.to_host(i, x)

    def _prefetch(self, i: int) -> None:
        if i in self._host:
            self._coming[i] = self.mover.to_device(i, self._host.pop(i))

    def load(self, i: int) -> torch.Tensor:
        """Layer i's input back on the device; starts bringing back the next one backward needs."""
        self._prefetch(i)  # a no-op unless layer i is the first offloaded one backward meets
        x = self.mover.wait(i, self._coming.pop(i))
        earlier = [j for j in self._host if j < i]
        if earlier:
            self._prefetch(max(earlier))
        return x


def _rng_state(device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, layer, offloader, index, x, document_ids, *rope):
        ctx.layer, ctx.offloader, ctx.index = layer, offloader, index
        dev = x.device.type
        ctx.autocast = (dev, torch.get_autocast_dtype(dev), torch.is_autocast_enabled(dev))
        ctx.rng = _rng_state(x.device)
        ctx.save_for_backward(document_ids, *rope)
        offloader.save(index, x)  # the copy overlaps this layer's forward
        with torch.no_grad():
            return layer(x, rope or None, document_ids)

    @staticmethod
    def backward(ctx, grad_out):
        x = ctx.offloader.load(ctx.index).detach().requires_grad_()
        document_ids, *rope = ctx.saved_tensors
        rope = tuple(rope) or None
        dev, dtype, enabled = ctx.autocast
        cpu_rng, cuda_rng = ctx.rng
        with torch.random.fork_rng(devices=[x.device] if cuda_rng is not None else []):
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, x.device)
            with torch.enable_grad(), torch.autocast(dev, dtype=dtype, enabled=enabled):
                out = ctx.layer(x, rope, document_ids)
        torch.autograd.backward(out, grad_out)
        return None, None, None, x.grad, None, *([None] * (len(ctx.saved_tensors) - 1))


def offloaded_checkpoint(layer, x, rope, document_ids, offloader: Offloader, index: int):
    """``layer(x, rope, document_ids)`` whose input waits in host memory (via ``offloader``) until backward."""
    return _OffloadedCheckpoint.apply(layer, offloader, index, x, document_ids, *(rope or ()))
