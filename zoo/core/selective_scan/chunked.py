"""Chunked PyTorch selective scan: the CPU path (and the fallback on any device without kernels).

A sequential loop over L steps on CPU is bound by per-step overhead when a step is small
(few channels, small batch) and by memory bandwidth when it is large. This path cuts the sequence
into ``nc`` chunks of T steps and runs the recurrence on all chunks at once, so each Python-level
step works on a slab of about ``target_slab`` elements:

1. from zero states, every chunk's end state and total decay (T steps; skipped when nc == 1),
2. the true state carried across chunk boundaries (nc small steps),
3. every chunk rerun from its true start state, reading out y (T steps).

It does the same multiplications as the sequential recurrence (no exp(-cumsum) factors that
could overflow), never materialises B or C per channel (grouped layouts stay broadcast views),
and uses plain autograd for the backward.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

# Elements per Python-level step: large enough to amortise the ~10 us dispatch cost of a torch
# op, small enough that the running state stays in a core's L2 cache.
TARGET_SLAB = 1 << 16


def default_num_chunks(batch: int, length: int, dim: int, d_state: int) -> int:
    per_step = batch * dim * d_state
    nc = max(1, min(TARGET_SLAB // max(per_step, 1), length // 8))
    return nc


def _as_groups(BC: torch.Tensor) -> torch.Tensor:
    """(b, l, n) -> (b, l, 1, n); (b, l, g, n) unchanged."""
    return BC.unsqueeze(2) if BC.dim() == 3 else BC


def selective_scan_chunked(
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
    num_chunks: Optional[int] = None,
):
    """Same contract as :func:`selective_scan_naive`; inputs are assumed validated.

    ``num_chunks`` overrides the automatic choice (tests use it to exercise every regime).
    """
    dtype_in = u.dtype
    acc = torch.float64 if u.dtype == torch.float64 else torch.float32
    u32, delta, A = u.to(acc), delta.to(acc), A.to(acc)
    if delta_bias is not None:
        delta = delta + delta_bias.to(acc)
    if delta_softplus:
        delta = F.softplus(delta)
    Bg, Cg = _as_groups(B.to(acc)), _as_groups(C.to(acc))
    b, l, dim = u.shape
    n, g = A.shape[1], Bg.shape[2]
    if Cg.shape[2] != g:  # B and C grouped differently: broadcast both to per-channel groups
        g = dim
        Bg = Bg.repeat_interleave(dim // Bg.shape[2], dim=2)
        Cg = Cg.repeat_interleave(dim // Cg.shape[2], dim=2)
    dg = dim // g
    dtu = delta * u32
    if reverse:
        delta, dtu, Bg, Cg = delta.flip(1), dtu.flip(1), Bg.flip(1), Cg.flip(1)

    nc = num_chunks or default_num_chunks(b, l, dim, n)
    nc = max(1, min(nc, l))
    T = -(-l // nc)
    pad = nc * T - l

    def steps(t: torch.Tensor) -> tuple:
        # (b, l, ...) -> T tensors of (b, nc, ...). Padded steps have dt = 0: decay exp(0) = 1
        # and no input, so the carried state passes through them unchanged.
        if pad:
            t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        t = t.reshape(b, nc, T, *t.shape[2:]).movedim(2, 0)
        # unbind, not indexing: its backward is one stack, where indexing step by step would
        # write a full-size zero gradient per step.
        return t.unbind(0)

    A_g = A.view(g, dg, n)
    dts = steps(delta.view(b, l, g, dg, 1))
    dtus = steps(dtu.view(b, l, g, dg, 1))
    Bs = steps(Bg.unsqueeze(3))  # (b, nc, g, 1, n)
    Cs = steps(Cg.unsqueeze(3))

    h0 = None if initial_state is None else initial_state.to(acc).view(b, g, dg, n)
    zero = u32.new_zeros(b, g, dg, n)
    if nc == 1:
        starts = (h0 if h0 is not None else zero).unsqueeze(1)
    else:
        h = u32.new_zeros(b, nc, g, dg, n)
        log_decay = u32.new_zeros(b, nc, g, dg, n)
        for t in range(T):
            h = torch.exp(dts[t] * A_g) * h + dtus[t] * Bs[t]
            log_decay = log_decay + dts[t] * A_g
        total_decay = torch.exp(log_decay)
        carry = h0 if h0 is not None else zero
        starts = []
        for c in range(nc):
            starts.append(carry)
            carry = total_decay[:, c] * carry + h[:, c]
        starts = torch.stack(starts, dim=1)
    h = starts
    ys = []
    for t in range(T):
        h = torch.exp(dts[t] * A_g) * h + dtus[t] * Bs[t]
        ys.append((h * Cs[t]).sum(-1))  # (b, nc, g, dg)
    last = h[:, -1].reshape(b, dim, n)
    y = torch.stack(ys, dim=2).reshape(b, nc * T, dim)[:, :l]
    if reverse:
        y = y.flip(1)
    if D is not None:
        y = y + u32 * D.to(acc)
    if z is not None:
        y = y * F.silu(z.to(acc))
    out = y.to(dtype_in)
    return (out, last) if return_last_state else out
