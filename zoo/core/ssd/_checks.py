"""Argument validation and the dt transform shared by every SSD path."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..precision import upcast
from ..selective_scan._checks import _shape

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_ssd_args(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor],
    z: Optional[torch.Tensor],
    dt_bias: Optional[torch.Tensor],
    dt_limit: Sequence[float],
    initial_state: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor],
    chunk_size: int,
    op: str = "ssd_scan",
) -> None:
    """Raise a ValueError (TypeError for dtypes) naming what was expected and what came."""
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be (batch, length, nheads, headdim), got shape {_shape(x)}")
    batch, length, nheads, headdim = x.shape
    if dt.shape != (batch, length, nheads):
        raise ValueError(f"{op}: dt must be (batch={batch}, length={length}, nheads={nheads}), got shape {_shape(dt)}")
    if A.shape != (nheads,):
        raise ValueError(f"{op}: A must be (nheads={nheads},) (one scalar decay per head), got shape {_shape(A)}")
    if A.is_complex():
        raise ValueError(f"{op}: complex A is not supported; pass a real (nheads,) tensor")
    if B.dim() != 4 or B.shape[:2] != (batch, length):
        raise ValueError(f"{op}: B must be (batch={batch}, length={length}, ngroups, d_state), got shape {_shape(B)}")
    ngroups, d_state = B.shape[2], B.shape[3]
    if ngroups < 1 or nheads % ngroups:
        raise ValueError(f"{op}: ngroups={ngroups} (B's third axis) must divide nheads={nheads}")
    if C.shape != B.shape:
        raise ValueError(f"{op}: C must have B's shape {_shape(B)}, got {_shape(C)}")
    if D is not None and D.shape not in ((nheads,), (nheads, headdim)):
        raise ValueError(f"{op}: D must be ({nheads},) or ({nheads}, {headdim}), got shape {_shape(D)}")
    if dt_bias is not None and dt_bias.shape != (nheads,):
        raise ValueError(f"{op}: dt_bias must be ({nheads},), got shape {_shape(dt_bias)}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"{op}: z must have x's shape {_shape(x)}, got {_shape(z)}")
    lo, hi = dt_limit
    if not (0.0 <= lo <= hi) or math.isnan(hi):
        raise ValueError(f"{op}: dt_limit must be (low, high) with 0 <= low <= high, got {tuple(dt_limit)}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be a positive int, got {chunk_size!r}")
    n_seqs = batch if cu_seqlens is None else cu_seqlens.numel() - 1
    want = (n_seqs, nheads, headdim, d_state)
    if initial_state is not None and initial_state.shape != want:
        raise ValueError(f"{op}: initial_state must be {want}, got shape {_shape(initial_state)}")
    if cu_seqlens is not None:
        if batch != 1:
            raise ValueError(f"{op}: packed sequences (cu_seqlens) need batch 1, got batch {batch}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"{op}: cu_seqlens must be a 1-D int32/int64 tensor [0, l1, l1+l2, ..., total], "
                f"got {cu_seqlens.dtype} of shape {_shape(cu_seqlens)}"
            )
        cu = cu_seqlens.tolist()
        if cu[0] != 0 or cu[-1] != length or any(b < a for a, b in zip(cu, cu[1:])):
            raise ValueError(f"{op}: cu_seqlens must start at 0, be non-decreasing and end at length {length}, got {cu}")
    for name, t in (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C), ("z", z)):
        if t is not None and t.dtype not in _FLOATS:
            raise TypeError(f"{op}: {name} must be a floating tensor, got {t.dtype}")


def prepare_dt(
    dt: torch.Tensor, dt_bias: Optional[torch.Tensor], dt_softplus: bool, dt_limit: Sequence[float]
) -> torch.Tensor:
    """clamp(softplus(dt + dt_bias), *dt_limit) in float32 (float64 for float64 dt), as mamba-ssm's SSD."""
    dt = upcast(dt)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != (0.0, float("inf")):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def heads_of_groups(BC: torch.Tensor, nheads: int) -> torch.Tensor:
    """(b, l, g, n) -> (b, l, nheads, n): head h reads group h // (nheads // g) (a broadcast view)."""
    b, l, g, n = BC.shape
    return BC.unsqueeze(3).expand(b, l, g, nheads // g, n).reshape(b, l, nheads, n)


def skip_term(D: Optional[torch.Tensor], x: torch.Tensor) -> Optional[torch.Tensor]:
    """D * x with D per head (h,) or per channel (h, p); x (b, l, h, p)."""
    if D is None:
        return None
    return x * (D[:, None] if D.dim() == 1 else D).to(x.dtype)
