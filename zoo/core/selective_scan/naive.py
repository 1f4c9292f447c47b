"""Sequential reference for the selective scan: the oracle every fast path is tested against.

Channels-last layout (batch, length, dim), one explicit step per time index, float32 (or float64
when the inputs are float64) state. Written for clarity, not speed.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._checks import expand_groups
from .transition import decay


def selective_scan_naive(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    reverse: bool = False,
    initial_state: Optional[torch.Tensor] = None,
    negative_eigenvalues: bool = False,
):
    """h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t;  y_t = C_t . h_t + D u_t;  out_t = y_t silu(z_t).

    Shapes: u, delta, z (b, l, d); A (d, n); B, C (b, l, n) or (b, l, g, n); D, delta_bias (d,);
    initial_state (b, d, n). With ``reverse`` the recurrence runs from the last step to the first;
    ``negative_eigenvalues`` uses the transition 2 exp(dt A) - 1 (see ``transition``).
    Inputs are assumed validated (see ``selective_scan``).
    """
    dtype_in = u.dtype
    acc = torch.float64 if u.dtype == torch.float64 else torch.float32
    u, delta, A = u.to(acc), delta.to(acc), A.to(acc)
    if delta_bias is not None:
        delta = delta + delta_bias.to(acc)
    if delta_softplus:
        delta = F.softplus(delta)
    dim = u.shape[-1]
    Bd = expand_groups(B.to(acc), dim)  # (b, l, d, n)
    Cd = expand_groups(C.to(acc), dim)
    batch, length = u.shape[:2]
    h = u.new_zeros(batch, dim, A.shape[1]) if initial_state is None else initial_state.to(acc)
    # unbind, not indexing: its backward is one stack, where t-indexing would write a full-size
    # zero gradient per step.
    dts, us, Bs, Cs = delta.unbind(1), u.unbind(1), Bd.unbind(1), Cd.unbind(1)
    ys = [None] * length
    steps = range(length - 1, -1, -1) if reverse else range(length)
    for t in steps:
        dt = dts[t][..., None]  # (b, d, 1)
        h = decay(dt * A, negative_eigenvalues) * h + dt * Bs[t] * us[t][..., None]
        ys[t] = (h * Cs[t]).sum(-1)
    y = torch.stack(ys, dim=1) if length else u.new_zeros(batch, 0, dim)  # stack refuses an empty list
    if D is not None:
        y = y + u * D.to(acc)
    if z is not None:
        y = y * F.silu(z.to(acc))
    out = y.to(dtype_in)
    return (out, h) if return_last_state else out
