"""The residual block of mamba-ssm and Vim: Add -> Norm -> Mixer, residual stream kept apart.

Each block returns (mixer output, residual); the next block adds them. Keeping the residual
separate (in float32 with ``residual_in_fp32``) is what lets the add and the norm be fused.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from timm.layers import DropPath
from torch import nn

from .norm import RMSNorm
from .precision import upcast


def add_norm(
    hidden: torch.Tensor,
    residual: Optional[torch.Tensor],
    norm: nn.Module,
    drop_path: Optional[nn.Module] = None,
    residual_in_fp32: bool = True,
):
    """residual <- hidden (first block) or residual + drop_path(hidden); returns
    (norm(residual) in hidden's dtype, residual). ``residual_in_fp32`` keeps the residual stream in at
    least float32: float16/bfloat16 residuals are upcast, float64 ones stay float64 (mamba-ssm's
    ``.to(float32)`` would round them). On CUDA an RMSNorm with a float32 residual runs as one fused
    Triton kernel (one launch instead of six)."""
    if _fused_add_norm_applies(hidden, norm, residual_in_fp32):
        from zoo.kernels.norm import add_rms_norm_triton  # lazily: the CPU path needs no Triton

        if residual is not None and drop_path is not None:
            hidden = drop_path(hidden)
        return add_rms_norm_triton(hidden, residual, norm.weight, norm.eps, residual_in_fp32=True)
    return add_norm_reference(hidden, residual, norm, drop_path, residual_in_fp32)


def add_norm_reference(
    hidden: torch.Tensor,
    residual: Optional[torch.Tensor],
    norm: nn.Module,
    drop_path: Optional[nn.Module] = None,
    residual_in_fp32: bool = True,
):
    """``add_norm`` in plain PyTorch, on any device (the reference the fused kernel is tested against)."""
    if residual is None:
        residual = hidden
    else:
        residual = residual + (drop_path(hidden) if drop_path is not None else hidden)
    if residual_in_fp32:
        residual = upcast(residual)
    # As mamba-ssm's Block: the norm reads the residual in its weight's dtype (a model cast to half keeps a
    # float32 residual that a half LayerNorm would refuse).
    weight = getattr(norm, "weight", None)
    normed = norm(residual if weight is None else residual.to(weight.dtype))
    return normed.to(hidden.dtype), residual


def _fused_add_norm_applies(hidden: torch.Tensor, norm: nn.Module, residual_in_fp32: bool) -> bool:
    # The kernel keeps a float32 residual: float64 inputs take the reference path and stay float64.
    return hidden.is_cuda and residual_in_fp32 and type(norm) is RMSNorm and hidden.dtype != torch.float64


class ResidualBlock(nn.Module):
    def __init__(self, dim: int, mixer: nn.Module, norm: nn.Module, drop_path: float = 0.0, residual_in_fp32: bool = True):
        super().__init__()
        self.dim = dim
        self.mixer = mixer
        self.norm = norm
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.residual_in_fp32 = residual_in_fp32

    def forward(self, hidden: torch.Tensor, residual: Optional[torch.Tensor] = None):
        hidden, residual = add_norm(hidden, residual, self.norm, self.drop_path, self.residual_in_fp32)
        return self.mixer(hidden), residual


def init_mamba_weights(module: nn.Module, n_layer: int, rescale_prenorm_residual: bool = True, n_residuals_per_layer: int = 1):
    """mamba-ssm's ``_init_weights``, applied with ``model.apply(partial(init_mamba_weights, n_layer=...))``.

    Zeroes Linear biases (except those marked ``_no_reinit``, the dt biases) and rescales each
    out_proj by 1/sqrt(n_residuals_per_layer * n_layer) so the residual stream's variance does not
    grow with depth (GPT-2's scheme).
    """
    if isinstance(module, nn.Linear) and module.bias is not None and not getattr(module.bias, "_no_reinit", False):
        nn.init.zeros_(module.bias)
    if rescale_prenorm_residual:
        # Matches only the module that owns out_proj directly (the mixer), as in mamba-ssm.
        for name, p in module.named_parameters():
            if name in ("out_proj.weight", "fc2.weight"):
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
                with torch.no_grad():
                    p /= math.sqrt(n_residuals_per_layer * n_layer)
