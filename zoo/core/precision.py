"""The precision rule of the core: state, accumulation and "fp32" parameters are at least float32.

mamba-ssm and the official model code cast such tensors with ``.float()`` / ``.to(torch.float32)``, which is
the same thing for half, bfloat16 and float32 inputs but rounds float64 down; float64 is how this zoo checks
itself against the official forwards, so it must pass through unrounded.
"""
from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half, bfloat16 and float32; float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def upcast(t: torch.Tensor) -> torch.Tensor:
    """``t`` in :func:`compute_dtype` of its dtype (``.float()`` that leaves float64 alone)."""
    return t.to(compute_dtype(t.dtype))
