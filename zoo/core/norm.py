"""Normalisation layers of the Mamba family."""
from __future__ import annotations

import torch
from torch import nn

from .precision import upcast


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight, computed in float32 (float64 for float64 x) and returned in
    x's dtype."""
    xf = upcast(x)
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        out = out * weight.to(xf.dtype)
    return out.to(x.dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension (mamba-ssm's RMSNorm: float32 compute, float64 for float64 input)."""

    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.weight.shape[0]:
            raise ValueError(f"RMSNorm: expected last dimension {self.weight.shape[0]}, got input of shape {tuple(x.shape)}")
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
