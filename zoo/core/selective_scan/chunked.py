"""Chunked PyTorch selective scan: the CPU path (and the fallback on any device without kernels).

A sequential loop over L steps on CPU is bound by per-step overhead when a step is small
(few channels, small batch) and by memory bandwidth when it is large. This path cuts the sequence
into ``nc`` chunks of T steps and runs the recurrence on all chunks at once, so each Python-level
step works on a slab of about ``target_slab`` elements:

1. from zero states, every chunk's end state and total decay (T steps; skipped when nc == 1),
2. the true state carried across chunk boundaries (nc small steps),
3. every chunk rerun from its true start state, reading out y (T steps).

It does the same multiplications as the sequential recurrence (no exp(-cumsum) factors that
could overflow) and never materialises B or C per channel (grouped layouts stay broadcast views).
The backward is written by hand with the same chunked scheme run backwards in time; it saves only
the inputs and the chunk-start states and recomputes the rest.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .transition import decay, decay_grad

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
    negative_eigenvalues: bool = False,
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

    def steps(t: torch.Tensor) -> torch.Tensor:
        # (b, l, ...) -> (T, b, nc, ...). Padded steps have dt = 0: decay exp(0) = 1 and no
        # input, so the carried state passes through them unchanged.
        if pad:
            t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        return t.reshape(b, nc, T, *t.shape[2:]).movedim(2, 0)

    h0 = u32.new_zeros(b, g, dg, n) if initial_state is None else initial_state.to(acc).view(b, g, dg, n)
    y, last = _ChunkedScan.apply(
        steps(delta.view(b, l, g, dg, 1)), steps(dtu.view(b, l, g, dg, 1)), A.view(g, dg, n),
        steps(Bg.unsqueeze(3)), steps(Cg.unsqueeze(3)), h0, negative_eigenvalues,
    )
    y = y.movedim(0, 2).reshape(b, nc * T, dim)[:, :l]
    last = last.reshape(b, dim, n)
    if reverse:
        y = y.flip(1)
    if D is not None:
        y = y + u32 * D.to(acc)
    if z is not None:
        y = y * F.silu(z.to(acc))
    out = y.to(dtype_in)
    return (out, last) if return_last_state else out


class _ChunkedScan(torch.autograd.Function):
    """The recurrence on chunk-major tensors, with a hand-written backward.

    Shapes: dt, dtu (T, b, nc, g, dg, 1); A (g, dg, n); B, C (T, b, nc, g, 1, n); h0 (b, g, dg, n).
    Returns y (T, b, nc, g, dg) and the final state (b, g, dg, n). Only the inputs and the nc
    chunk-start states are saved; the backward recomputes the states, so training memory is
    O(b l d) per scan rather than O(b l d n).
    """

    @staticmethod
    def forward(ctx, dt, dtu, A, B, C, h0, negative_eigenvalues):
        T, nc = dt.shape[0], dt.shape[2]
        if nc == 1:
            starts = h0.unsqueeze(1)
        else:
            # Pass 1: every chunk from a zero state; its end state and total decay.
            h = torch.zeros_like(h0).unsqueeze(1).expand(-1, nc, -1, -1, -1).contiguous()
            total_decay = _TotalDecay(h, negative_eigenvalues)
            for t in range(T):
                h = decay(dt[t] * A, negative_eigenvalues) * h + dtu[t] * B[t]
                total_decay.step(dt[t] * A)
            total_decay = total_decay.value()
            carry, starts = h0, []
            for c in range(nc):  # carry the true state across chunk boundaries
                starts.append(carry)
                carry = total_decay[:, c] * carry + h[:, c]
            starts = torch.stack(starts, dim=1)
        # Pass 2: every chunk from its true start state, reading out y.
        h = starts
        y = dt.new_empty(dt.shape[:-1])
        for t in range(T):
            h = decay(dt[t] * A, negative_eigenvalues) * h + dtu[t] * B[t]
            y[t] = (h * C[t]).sum(-1)
        ctx.save_for_backward(dt, dtu, A, B, C, starts)
        ctx.negative_eigenvalues = negative_eigenvalues
        return y, h[:, -1].contiguous()

    @staticmethod
    def backward(ctx, g_y, g_last):
        dt, dtu, A, B, C, starts = ctx.saved_tensors
        signed = ctx.negative_eigenvalues
        T, nc = dt.shape[0], dt.shape[2]
        a = decay(dt * A, signed)  # (T, b, nc, g, dg, n)
        H = torch.empty_like(a)  # recomputed states
        h = starts
        for t in range(T):
            h = a[t] * h + dtu[t] * B[t]
            H[t] = h
        g_y = g_y.unsqueeze(-1)
        out_grad = C * g_y  # d loss / d h_t through y_t
        # dh_t = C_t g_y_t + a_{t+1} dh_{t+1}: the same chunked trick, run backwards in time.
        incoming = torch.zeros_like(starts)  # a_{next} * dh_{next} arriving at each chunk's last step
        if g_last is not None:
            incoming[:, -1] = g_last
        if nc > 1:
            acc = torch.zeros_like(starts)
            total_decay = _TotalDecay(starts, signed)
            for t in range(T - 1, -1, -1):
                acc = a[t] * (out_grad[t] + acc)
                total_decay.step(dt[t] * A)
            total_decay = total_decay.value()
            for c in range(nc - 1, 0, -1):
                incoming[:, c - 1] = acc[:, c] + total_decay[:, c] * incoming[:, c]
        dH = torch.empty_like(a)
        acc = incoming
        for t in range(T - 1, -1, -1):
            dH[t] = out_grad[t] + acc
            acc = a[t] * dH[t]
        g_h0 = acc[:, 0]
        H_prev = torch.cat([starts.unsqueeze(0), H[:-1]], dim=0)
        g_dtA = dH * H_prev * decay_grad(a, signed)  # d loss / d (dt A) through the decay
        g_dt = (g_dtA * A).sum(-1, keepdim=True)
        g_A = (g_dtA * dt).sum(dim=(0, 1, 2))
        g_dtu = (dH * B).sum(-1, keepdim=True)
        g_B = (dH * dtu).sum(-2, keepdim=True)
        g_C = (H * g_y).sum(-2, keepdim=True)
        # Hand the step-major gradients back batch-major in memory, the layout ``steps`` took the inputs from: the
        # permute back is then contiguous. (With one chunk the step-major gradients also pass as views of a
        # (b, l, ...) tensor, and AOTAutograd's stride prediction for them disagrees with eager: torch.compile's
        # backward failed in a view for sequences under 16 steps.)
        g_dt, g_dtu, g_B, g_C = (g.movedim(0, 2).contiguous().movedim(2, 0) for g in (g_dt, g_dtu, g_B, g_C))
        return g_dt, g_dtu, g_A, g_B, g_C, g_h0, None


class _TotalDecay:
    """The product of a chunk's transitions: exp of the summed exponents in (0, 1), a running product of
    the signed transitions with negative eigenvalues (no logarithm of a negative number)."""

    def __init__(self, like: torch.Tensor, negative_eigenvalues: bool):
        self.signed = negative_eigenvalues
        self.acc = torch.ones_like(like) if negative_eigenvalues else torch.zeros_like(like)

    def step(self, dtA: torch.Tensor) -> None:
        if self.signed:
            self.acc = self.acc * decay(dtA, True)
        else:
            self.acc += dtA

    def value(self) -> torch.Tensor:
        return self.acc if self.signed else torch.exp(self.acc)
