"""Sequential reference for the SSD scan: the oracle every fast path is tested against.

One explicit step per time index over the (headdim, d_state) state of every head, in float32 (float64
for float64 inputs). Written for clarity, not speed.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..precision import compute_dtype
from ..selective_scan.transition import decay
from ._checks import heads_of_groups, skip_term


def ssd_scan_naive(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    initial_state: Optional[torch.Tensor] = None,
    reverse: bool = False,
    negative_eigenvalues: bool = False,
):
    """h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T;  y_t = h_t C_t + D x_t;  out_t = y_t silu(z_t).

    ``dt`` is the final step size (bias, softplus and limits already applied, see ``prepare_dt``).
    Shapes: x, z (b, l, h, p); dt (b, l, h); A (h,); B, C (b, l, g, n); D (h,) or (h, p);
    initial_state (b, h, p, n). ``negative_eigenvalues``: the transition 2 exp(dt A) - 1 instead of exp(dt A).
    Returns (out in x's dtype, final state in the accumulation dtype).
    """
    acc = compute_dtype(x.dtype)
    b, length, nheads, headdim = x.shape
    xa, dta, Aa = x.to(acc), dt.to(acc), A.to(acc)
    Bh, Ch = heads_of_groups(B.to(acc), nheads), heads_of_groups(C.to(acc), nheads)
    h = x.new_zeros(b, nheads, headdim, B.shape[-1], dtype=acc) if initial_state is None else initial_state.to(acc)
    ys = [None] * length
    for t in (range(length - 1, -1, -1) if reverse else range(length)):
        a = decay(dta[:, t] * Aa, negative_eigenvalues)[..., None, None]  # (b, h, 1, 1)
        h = a * h + (dta[:, t, :, None] * xa[:, t])[..., None] * Bh[:, t, :, None, :]
        ys[t] = (h * Ch[:, t, :, None, :]).sum(-1)
    y = torch.stack(ys, dim=1) if length else xa.new_zeros(b, 0, nheads, headdim)
    skip = skip_term(D, xa)
    if skip is not None:
        y = y + skip
    if z is not None:
        y = y * F.silu(z.to(acc))
    return y.to(x.dtype), h
