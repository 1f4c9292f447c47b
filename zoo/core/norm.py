"""Normalisation layers of the Mamba family."""
from __future__ import annotations

import torch
import torch.nn.functional as F
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


def gated_rms_norm(
    x: torch.Tensor, weight: torch.Tensor, z: torch.Tensor | None, eps: float, group_size: int | None = None,
    norm_before_gate: bool = False,
) -> torch.Tensor:
    """Mamba-2's gated RMSNorm (mamba-ssm ``layernorm_gated.rms_norm_ref`` with upcast): with ``z``, the gate
    silu(z) multiplies x before the norm (``norm_before_gate=False``) or the normed output; the mean square is
    taken over groups of ``group_size`` channels (all channels when None). Computed in float32 (float64 for
    float64 x), returned in x's dtype."""
    xf = upcast(x)
    if z is not None and not norm_before_gate:
        xf = xf * F.silu(z.to(xf.dtype))
    d = x.shape[-1]
    g = xf.reshape(*xf.shape[:-1], d // (group_size or d), group_size or d)
    out = (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)).reshape(xf.shape) * weight.to(xf.dtype)
    if z is not None and norm_before_gate:
        out = out * F.silu(z.to(xf.dtype))
    return out.to(x.dtype)


class RMSNormGated(nn.Module):
    """mamba-ssm's ``RMSNorm`` of ``layernorm_gated`` (Mamba-2's output norm): ``forward(x, z=None)``."""

    def __init__(self, dim: int, eps: float = 1e-5, group_size: int | None = None, norm_before_gate: bool = True,
                 device=None, dtype=None):
        super().__init__()
        if group_size is not None and (group_size < 1 or dim % group_size):
            raise ValueError(f"RMSNormGated: group_size must divide dim={dim}, got {group_size}")
        self.eps, self.group_size, self.norm_before_gate = eps, group_size, norm_before_gate
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[-1] != self.weight.shape[0] or (z is not None and z.shape != x.shape):
            raise ValueError(f"RMSNormGated: expected x (..., {self.weight.shape[0]}) and z of x's shape, got x "
                             f"{tuple(x.shape)}, z {None if z is None else tuple(z.shape)}")
        return gated_rms_norm(x, self.weight, z, self.eps, self.group_size, self.norm_before_gate)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, group_size={self.group_size}, norm_before_gate={self.norm_before_gate}"
