"""One decoding step of the selective scan (mamba-ssm's ``selective_state_update`` semantics).

Per batch b, head h, channel p, state n (a Mamba-1 mixer is one head of d_inner channels; a Mamba-2 head
shares A, dt and D across its channels, passed broadcast)::

    dt     = softplus(dt + dt_bias)                  (softplus only when dt_softplus)
    S'     = decay(dt * A) * S + dt * B[g(h)] * x    (decay exp, or 2 exp - 1 with negative eigenvalues)
    y      = sum_n C[g(h)] * S' + D * x
    out    = y * silu(z)                              (when z is given)

CUDA tensors go to the Triton kernel (``zoo.kernels.state_update``), others to the PyTorch form below, which
is also its test reference. Returns (out in x's dtype, the new state in the state's dtype); the state passed
in is not modified, unless ``inplace=True`` (decoding loops: the new state is written over it and returned).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..precision import compute_dtype
from .transition import decay


def _check(state, x, dt, A, B, C, D, z, dt_bias):
    if x.dim() != 3 or state.dim() != 4 or state.shape[:3] != x.shape:
        raise ValueError("selective_state_update: expected state (batch, nheads, dim, d_state) and x (batch, nheads, "
                         f"dim), got state {tuple(state.shape)} and x {tuple(x.shape)}")
    b, h, p, n = state.shape
    for name, t, want in (("dt", dt, (b, h, p)), ("A", A, (h, p, n)), ("D", D, (h, p)), ("z", z, (b, h, p)),
                          ("dt_bias", dt_bias, (h, p))):
        if t is not None and tuple(t.shape) != want:
            raise ValueError(f"selective_state_update: {name} must be {want}, got shape {tuple(t.shape)}")
    for name, t in (("B", B), ("C", C)):
        if t.dim() != 3 or t.shape[0] != b or t.shape[2] != n or t.shape[1] < 1 or h % t.shape[1]:
            raise ValueError(f"selective_state_update: {name} must be (batch={b}, ngroups, d_state={n}) with ngroups "
                             f"dividing nheads={h}, got shape {tuple(t.shape)}")


def selective_state_update_torch(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                                 negative_eigenvalues=False):
    acc = compute_dtype(torch.promote_types(x.dtype, state.dtype))
    h = x.shape[1]
    dt = dt.to(acc) + (0 if dt_bias is None else dt_bias.to(acc))
    if dt_softplus:
        dt = F.softplus(dt)
    Bh = B.to(acc).repeat_interleave(h // B.shape[1], dim=1)[:, :, None, :]  # (b, h, 1, n)
    Ch = C.to(acc).repeat_interleave(h // C.shape[1], dim=1)[:, :, None, :]
    new = decay(dt[..., None] * A.to(acc), negative_eigenvalues) * state.to(acc) + (dt * x.to(acc))[..., None] * Bh
    y = (new * Ch).sum(-1)
    if D is not None:
        y = y + D.to(acc) * x.to(acc)
    if z is not None:
        y = y * F.silu(z.to(acc))
    return y.to(x.dtype), new.to(state.dtype)


def selective_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None,
    dt_softplus: bool = False,
    negative_eigenvalues: bool = False,
    inplace: bool = False,
):
    """See the module docstring. Shapes: state (b, h, p, n); x, dt, z (b, h, p); A (h, p, n); B, C (b, g, n);
    D, dt_bias (h, p). Broadcast views (expanded, stride 0) are fine for A, dt, D and dt_bias."""
    _check(state, x, dt, A, B, C, D, z, dt_bias)
    if x.is_cuda:
        from zoo.kernels.state_update import selective_state_update_triton  # lazily: the CPU path needs no Triton

        return selective_state_update_triton(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, negative_eigenvalues,
                                             state_out=state if inplace else None)
    y, new = selective_state_update_torch(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, negative_eigenvalues)
    if inplace:
        state.copy_(new)
        return y, state
    return y, new
