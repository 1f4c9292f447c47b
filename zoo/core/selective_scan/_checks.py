"""Argument validation shared by every selective-scan path."""
from __future__ import annotations

from typing import Optional

import torch


def expand_groups(BC: torch.Tensor, dim: int) -> torch.Tensor:
    """(b, l, n) or (b, l, g, n) -> (b, l, dim, n); channel d reads group d // (dim // g)."""
    if BC.dim() == 3:
        return BC.unsqueeze(2).expand(-1, -1, dim, -1)
    b, l, g, n = BC.shape
    return BC.unsqueeze(3).expand(b, l, g, dim // g, n).reshape(b, l, dim, n)


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def check_scan_args(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor],
    z: Optional[torch.Tensor],
    delta_bias: Optional[torch.Tensor],
    initial_state: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor] = None,
) -> None:
    """Raise a ValueError naming the expected and the received shape for any mismatch."""
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be (batch, length, dim), got shape {_shape(u)}")
    batch, length, dim = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"selective_scan: delta must have u's shape {_shape(u)}, got {_shape(delta)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"selective_scan: A must be (dim={dim}, d_state), got shape {_shape(A)}")
    if A.is_complex():
        raise ValueError("selective_scan: complex A is not supported; pass a real (dim, d_state) tensor")
    d_state = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.dim() == 3:
            ok = t.shape == (batch, length, d_state)
        elif t.dim() == 4:
            ok = t.shape[:2] == (batch, length) and t.shape[3] == d_state and t.shape[2] > 0 and dim % t.shape[2] == 0
        else:
            ok = False
        if not ok:
            raise ValueError(
                f"selective_scan: {name} must be (batch={batch}, length={length}, d_state={d_state}) or "
                f"(batch, length, groups, d_state) with groups dividing dim={dim}, got shape {_shape(t)}"
            )
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (dim,):
            raise ValueError(f"selective_scan: {name} must be ({dim},), got shape {_shape(t)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"selective_scan: z must have u's shape {_shape(u)}, got {_shape(z)}")
    n_seqs = batch if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None and initial_state.shape != (n_seqs, dim, d_state):
        raise ValueError(
            f"selective_scan: initial_state must be ({n_seqs}, {dim}, {d_state}), got shape {_shape(initial_state)}"
        )
    if cu_seqlens is not None:
        if batch != 1:
            raise ValueError(f"selective_scan: packed sequences (cu_seqlens) need batch 1, got batch {batch}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                "selective_scan: cu_seqlens must be a 1-D int32/int64 tensor [0, l1, l1+l2, ..., total], "
                f"got {cu_seqlens.dtype} of shape {_shape(cu_seqlens)}"
            )
        cu = cu_seqlens.tolist()
        if cu[0] != 0 or cu[-1] != length or any(b < a for a, b in zip(cu, cu[1:])):
            raise ValueError(
                f"selective_scan: cu_seqlens must start at 0, be non-decreasing and end at length {length}, got {cu}"
            )
    floats = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    for name, t in (("u", u), ("delta", delta), ("B", B), ("C", C), ("z", z)):
        if t is not None and t.dtype not in floats:
            raise TypeError(f"selective_scan: {name} must be a floating tensor, got {t.dtype}")
