"""LayerNorm / RMSNorm modules behind one interface.

``Norm.forward(x, residual=None)``: with a residual it returns ``(norm(x + residual), x + residual)``
so the block can use a fused residual-add kernel when one is active.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Norm(nn.Module):
    def __init__(self, kind: str, hidden: int, eps: float = 1e-5, impl: str = "torch"):
        super().__init__()
        if kind not in ("LayerNorm", "RMSNorm"):
            raise ValueError(f"unknown normalization {kind!r}; use LayerNorm or RMSNorm")
        self.kind, self.eps, self.impl = kind, eps, impl
        self.weight = nn.Parameter(torch.ones(hidden))
        self.bias = nn.Parameter(torch.zeros(hidden)) if kind == "LayerNorm" else None

    def _norm(self, x):
        if self.kind == "LayerNorm":
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)

    def forward(self, x, residual=None):
        if residual is None:
            return self._norm(x)
        total = x + residual
        return self._norm(total), total


def build_norm(kind: str, hidden: int, eps: float = 1e-5, impl: str = "auto") -> Norm:
    return Norm(kind, hidden, eps, impl)
