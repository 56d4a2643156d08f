"""LayerNorm / RMSNorm modules behind one interface, with selectable kernels.

``Norm.forward(x)`` returns ``norm(x)``; ``Norm.forward(x, residual)`` returns
``(norm(x + residual), x + residual)`` so the block can use the fused residual-add kernel.

Kernels (``impl``, the --norm-impl flag):
- ``torch``: F.layer_norm / F.rms_norm.
- ``triton``: megalite.ops.triton_norm (CUDA; on CPU only under TRITON_INTERPRET=1, for tests).
- ``apex``: NVIDIA apex's fused LayerNorm / RMSNorm; an error when apex is not installed.
- ``auto``: Triton for CUDA inputs when triton imports and the hidden size fits, torch otherwise.
  Chosen per call from the input's device, since models are built on CPU and moved later.
"""

from __future__ import annotations

import functools
import importlib

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("LayerNorm", "RMSNorm")
IMPLS = ("auto", "triton", "apex", "torch")


@functools.cache
def _triton_norm(required: bool):
    """The megalite.ops.triton_norm module; None (or an error when ``required``) without triton."""
    try:
        return importlib.import_module("megalite.ops.triton_norm")
    except ImportError as e:
        if (e.name or "").split(".")[0] != "triton":
            raise
        if required:
            raise RuntimeError(
                "--norm-impl triton needs the triton package: pip install triton (or pip install 'megalite[triton]')"
            ) from e
        return None


def _apex_norm(kind: str):
    """apex's functional fused norm for ``kind``; an error when apex (or its RMSNorm) is missing."""
    try:
        mod = importlib.import_module("apex.normalization.fused_layer_norm")
    except ImportError as e:
        raise RuntimeError(
            "--norm-impl apex needs NVIDIA apex built with its CUDA extensions "
            "(https://github.com/NVIDIA/apex; the PyPI package 'apex' is unrelated); "
            "use --norm-impl auto or triton instead"
        ) from e
    name = "fused_layer_norm_affine" if kind == "LayerNorm" else "fused_rms_norm_affine"
    if not hasattr(mod, name):
        raise RuntimeError(f"this apex build has no {name}; upgrade apex or use --norm-impl triton")
    return getattr(mod, name)


def _backend(impl: str, x: torch.Tensor):
    """The triton_norm module when ``impl`` (resolved for this input) is Triton, else None."""
    if impl == "triton":
        return _triton_norm(required=True)
    if impl == "auto" and x.is_cuda:
        tn = _triton_norm(required=False)
        if tn is not None and x.shape[-1] <= tn.MAX_HIDDEN:
            return tn
    return None


def fused_norm(x, weight, bias=None, eps: float = 1e-5, residual=None, *, kind: str = "LayerNorm", impl: str = "auto"):
    """norm(x) over the last dim, or (norm(x + residual), x + residual) with a residual.
    ``bias`` is LayerNorm's shift (None for RMSNorm); ``impl`` as --norm-impl."""
    tn = _backend(impl, x)
    if tn is not None:
        if kind == "LayerNorm":
            return tn.layer_norm(x, weight, bias, eps, residual)
        return tn.rms_norm(x, weight, eps, residual)
    if residual is None:
        return _unfused(x, weight, bias, eps, kind, impl)
    total = x + residual
    return _unfused(total, weight, bias, eps, kind, impl), total


def _unfused(x, weight, bias, eps, kind, impl):
    shape = x.shape[-1:]
    if impl == "apex":
        if kind == "LayerNorm":
            return _apex_norm(kind)(x, weight, bias, shape, eps)
        return _apex_norm(kind)(x, weight, shape, eps)
    if kind == "LayerNorm":
        return F.layer_norm(x, shape, weight, bias, eps)
    return F.rms_norm(x, shape, weight, eps)


class Norm(nn.Module):
    def __init__(self, kind: str, hidden: int, eps: float = 1e-5, impl: str = "torch"):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown normalization {kind!r}; use LayerNorm or RMSNorm")
        if impl not in IMPLS:
            raise ValueError(f"unknown norm implementation {impl!r}; use one of {', '.join(IMPLS)}")
        # Fail when the model is built, not at the first step, if the chosen kernel is missing.
        if impl == "triton":
            _triton_norm(required=True)
        elif impl == "apex":
            _apex_norm(kind)
        self.kind, self.hidden, self.eps, self.impl = kind, hidden, eps, impl
        self.weight = nn.Parameter(torch.ones(hidden))
        self.bias = nn.Parameter(torch.zeros(hidden)) if kind == "LayerNorm" else None

    def extra_repr(self) -> str:
        return f"{self.kind}, {self.hidden}, eps={self.eps}, impl={self.impl}"

    def forward(self, x, residual=None):
        return fused_norm(x, self.weight, self.bias, self.eps, residual, kind=self.kind, impl=self.impl)


def build_norm(kind: str, hidden: int, eps: float = 1e-5, impl: str = "auto") -> Norm:
    return Norm(kind, hidden, eps, impl)
