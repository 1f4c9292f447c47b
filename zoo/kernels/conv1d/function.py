"""Causal depthwise conv1d: out[t] = act(bias + sum_j w[j] x[t - (k-1) + j]) per channel
(``reverse``: x[t + (k-1) - j], the causal conv of the flipped sequence, flipped back).

Channels-last: a program owns a (BLOCK_L, BLOCK_D) tile and reads the k shifted input tiles,
which overlap and come from cache. The backward recomputes the pre-activation, writes the
gradient of the input through the same shifted taps read the other way, and reduces the weight
and bias gradients over its rows before storing one partial row per program (summed in a fixed
order, so the result is deterministic).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..launch import cdiv

BLOCK_L, BLOCK_D = 32, 64


@triton.jit
def _tap(x_base, t, L, s_l, dmask):
    m = ((t >= 0) & (t < L))[:, None] & dmask[None, :]
    return tl.load(x_base[None, :] + t[:, None] * s_l, mask=m, other=0.0).to(tl.float32)


@triton.jit
def _pre(x_base, w_ptr, bias, t, L, s_l, d, dmask, s_wd, s_wk, KSIZE: tl.constexpr, REVERSE: tl.constexpr):
    acc = tl.zeros((t.shape[0], d.shape[0]), dtype=tl.float32) + bias[None, :]
    for j in tl.static_range(KSIZE):
        w = tl.load(w_ptr + d * s_wd + j * s_wk, mask=dmask, other=0.0).to(tl.float32)
        shift = KSIZE - 1 - j
        src = t + shift if REVERSE else t - shift
        acc += w[None, :] * _tap(x_base, src, L, s_l, dmask)
    return acc


@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, L, DIM, s_xb, s_xl, s_xd, s_wd, s_wk, s_ob, s_ol, s_od,
    KSIZE: tl.constexpr, REVERSE: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    BL: tl.constexpr, BD: tl.constexpr,
):
    t = tl.program_id(0) * BL + tl.arange(0, BL)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    b = tl.program_id(2).to(tl.int64)
    dmask = d < DIM
    bias = tl.load(b_ptr + d, mask=dmask, other=0.0).to(tl.float32) if HAS_BIAS else tl.zeros((BD,), tl.float32)
    y = _pre(x_ptr + b * s_xb + d * s_xd, w_ptr, bias, t, L, s_xl, d, dmask, s_wd, s_wk, KSIZE, REVERSE)
    if SILU:
        y = y * tl.sigmoid(y)
    m = (t < L)[:, None] & dmask[None, :]
    tl.store(out_ptr + b * s_ob + t[:, None] * s_ol + d[None, :] * s_od, y.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _conv_grad_pre_kernel(
    x_ptr, w_ptr, b_ptr, g_ptr, gpre_ptr, L, DIM, s_xb, s_xl, s_xd, s_wd, s_wk, s_gb, s_gl, s_gd,
    KSIZE: tl.constexpr, REVERSE: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    BL: tl.constexpr, BD: tl.constexpr,
):
    """Gradient at the pre-activation (float32, contiguous (b, l, d)); recomputes it for SiLU."""
    t = tl.program_id(0) * BL + tl.arange(0, BL)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    b = tl.program_id(2).to(tl.int64)
    dmask = d < DIM
    m = (t < L)[:, None] & dmask[None, :]
    g = tl.load(g_ptr + b * s_gb + t[:, None] * s_gl + d[None, :] * s_gd, mask=m, other=0.0).to(tl.float32)
    if SILU:
        bias = tl.load(b_ptr + d, mask=dmask, other=0.0).to(tl.float32) if HAS_BIAS else tl.zeros((BD,), tl.float32)
        y = _pre(x_ptr + b * s_xb + d * s_xd, w_ptr, bias, t, L, s_xl, d, dmask, s_wd, s_wk, KSIZE, REVERSE)
        sy = tl.sigmoid(y)
        g = g * sy * (1.0 + y * (1.0 - sy))
    tl.store(gpre_ptr + (b * L + t[:, None]) * DIM + d[None, :], g, mask=m)


@triton.jit
def _conv_bwd_kernel(
    x_ptr, w_ptr, gpre_ptr, dx_ptr, dw_ptr, L, DIM, s_xb, s_xl, s_xd, s_wd, s_wk,
    KSIZE: tl.constexpr, REVERSE: tl.constexpr, BL: tl.constexpr, BD: tl.constexpr,
):
    """dx[s] = sum_j w[j] gpre[s + shift_j] (taps read the other way); dw[j] = sum_t gpre[t]
    x[t - shift_j] and dbias over this program's rows, stored as one partial row."""
    pid_l = tl.program_id(0)
    t = pid_l * BL + tl.arange(0, BL)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    b = tl.program_id(2).to(tl.int64)
    dmask = d < DIM
    m = (t < L)[:, None] & dmask[None, :]
    g_base = gpre_ptr + b * L * DIM + d
    x_base = x_ptr + b * s_xb + d * s_xd
    g = _tap(g_base, t, L, DIM, dmask)
    dx = tl.zeros((BL, BD), dtype=tl.float32)
    prow = (b * tl.num_programs(0) + pid_l) * (KSIZE + 1)  # partial row of (b, l-block)
    for j in tl.static_range(KSIZE):
        w = tl.load(w_ptr + d * s_wd + j * s_wk, mask=dmask, other=0.0).to(tl.float32)
        shift = KSIZE - 1 - j
        dx += w[None, :] * _tap(g_base, t - shift if REVERSE else t + shift, L, DIM, dmask)
        xs = _tap(x_base, t + shift if REVERSE else t - shift, L, s_xl, dmask)
        tl.store(dw_ptr + (prow + j) * DIM + d, tl.sum(g * xs, axis=0), mask=dmask)
    tl.store(dw_ptr + (prow + KSIZE) * DIM + d, tl.sum(g, axis=0), mask=dmask)
    tl.store(dx_ptr + (b * L + t[:, None]) * DIM + d[None, :], dx.to(dx_ptr.dtype.element_ty), mask=m)


def _grid(x):
    b, L, dim = x.shape
    return (cdiv(L, BLOCK_L), cdiv(dim, BLOCK_D), b)


@torch.library.custom_op("zoo::causal_conv1d_fwd", mutates_args=())
def _conv_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], reverse: bool, silu: bool) -> torch.Tensor:
    b, L, dim = x.shape
    out = torch.empty((b, L, dim), dtype=x.dtype, device=x.device)
    _conv_fwd_kernel[_grid(x)](
        x, weight, bias if bias is not None else weight, out, L, dim, *x.stride(), *weight.stride(), *out.stride(),
        KSIZE=weight.shape[1], REVERSE=reverse, HAS_BIAS=bias is not None, SILU=silu, BL=BLOCK_L, BD=BLOCK_D,
    )
    return out


@_conv_fwd.register_fake
def _(x, weight, bias, reverse, silu):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("zoo::causal_conv1d_bwd", mutates_args=())
def _conv_bwd(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dout: torch.Tensor, reverse: bool, silu: bool
) -> list[torch.Tensor]:
    b, L, dim = x.shape
    k = weight.shape[1]
    grid = _grid(x)
    gpre = torch.empty((b, L, dim), dtype=torch.float32, device=x.device)
    _conv_grad_pre_kernel[grid](
        x, weight, bias if bias is not None else weight, dout, gpre, L, dim, *x.stride(), *weight.stride(),
        *dout.stride(), KSIZE=k, REVERSE=reverse, HAS_BIAS=bias is not None, SILU=silu, BL=BLOCK_L, BD=BLOCK_D,
    )
    dx = torch.empty((b, L, dim), dtype=x.dtype, device=x.device)
    partial = torch.empty((b * grid[0], k + 1, dim), dtype=torch.float32, device=x.device)
    _conv_bwd_kernel[grid](
        x, weight, gpre, dx, partial, L, dim, *x.stride(), *weight.stride(),
        KSIZE=k, REVERSE=reverse, BL=BLOCK_L, BD=BLOCK_D,
    )
    sums = partial.sum(0)  # (k + 1, dim): taps, then bias
    db = sums[k].to(bias.dtype) if bias is not None else x.new_empty((0,))
    return [dx, sums[:k].t().to(weight.dtype).contiguous(), db]


@_conv_bwd.register_fake
def _(x, weight, bias, dout, reverse, silu):
    return [
        torch.empty_like(x, memory_format=torch.contiguous_format), weight.new_empty(weight.shape),
        bias.new_empty(bias.shape) if bias is not None else x.new_empty((0,)),
    ]


def _setup(ctx, inputs, output):
    x, weight, bias, reverse, silu = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.flags = (reverse, silu)


def _backward(ctx, dout):
    x, weight, bias = ctx.saved_tensors
    dx, dw, db = _conv_bwd(x, weight, bias, dout, *ctx.flags)
    return dx, dw, db if bias is not None else None, None, None


_conv_fwd.register_autograd(_backward, setup_context=_setup)


def causal_conv1d_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, reverse: bool = False,
    activation: Optional[str] = None,
) -> torch.Tensor:
    """x (batch, length, dim), any strides; weight (dim, k) or nn.Conv1d's (dim, 1, k); bias (dim,)
    or None; activation None or "silu". Returns (batch, length, dim) in x's dtype."""
    if activation not in (None, "silu"):
        raise ValueError(f"causal_conv1d_triton: activation must be None or 'silu', got {activation!r}")
    if weight.dim() == 3:
        weight = weight[:, 0]
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[2]:
        raise ValueError(
            f"causal_conv1d_triton: expected x (batch, length, dim) and weight (dim, k) or (dim, 1, k) with the same "
            f"dim, got x {tuple(x.shape)} and weight {tuple(weight.shape)}"
        )
    if bias is not None and bias.shape != (x.shape[2],):
        raise ValueError(f"causal_conv1d_triton: bias must be ({x.shape[2]},), got {tuple(bias.shape)}")
    return _conv_fwd(x, weight, bias, reverse, activation == "silu")
