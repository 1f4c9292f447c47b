"""Fused residual add + RMSNorm: the residual-stream step of ``zoo.core.block.add_norm`` with an
RMSNorm, in one pass over the rows (one read of hidden and residual, one write of each output).

    residual_out = hidden (residual is None) or residual + hidden   (float32 when residual_in_fp32,
                                                                     else rounded to hidden's dtype)
    out          = residual_out * rsqrt(mean(residual_out^2) + eps) * weight   (in hidden's dtype)

The backward recomputes the normalised row from residual_out and the saved 1/rms, adds the
gradient arriving at residual_out, and writes one gradient shared by hidden and residual; the
weight gradient is reduced over each program's rows and summed over programs in a fixed order.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..launch import cdiv, next_power_of_2

ROWS = 4  # rows per program


@triton.jit
def _add_norm_fwd_kernel(
    h_ptr, r_ptr, w_ptr, out_ptr, rout_ptr, rstd_ptr, M, N, eps,
    HAS_RES: tl.constexpr, RES_FP32: tl.constexpr, BLOCK_N: tl.constexpr, ROWS_: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS_ + tl.arange(0, ROWS_)
    cols = tl.arange(0, BLOCK_N)
    m = (rows < M)[:, None] & (cols < N)[None, :]
    off = rows[:, None].to(tl.int64) * N + cols[None, :]
    x = tl.load(h_ptr + off, mask=m, other=0.0).to(tl.float32)
    if HAS_RES:
        x += tl.load(r_ptr + off, mask=m, other=0.0).to(tl.float32)
    if not RES_FP32:
        x = x.to(h_ptr.dtype.element_ty).to(tl.float32)  # the residual stream is kept in hidden's dtype
    tl.store(rout_ptr + off, x.to(rout_ptr.dtype.element_ty), mask=m)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
    w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    tl.store(out_ptr + off, (x * rstd[:, None] * w[None, :]).to(out_ptr.dtype.element_ty), mask=m)
    tl.store(rstd_ptr + rows, rstd, mask=rows < M)


@triton.jit
def _add_norm_bwd_kernel(
    rout_ptr, w_ptr, rstd_ptr, dy_ptr, drout_ptr, dx_ptr, dw_ptr, M, N,
    HAS_DROUT: tl.constexpr, BLOCK_N: tl.constexpr, ROWS_: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * ROWS_ + tl.arange(0, ROWS_)
    cols = tl.arange(0, BLOCK_N)
    m = (rows < M)[:, None] & (cols < N)[None, :]
    off = rows[:, None].to(tl.int64) * N + cols[None, :]
    x = tl.load(rout_ptr + off, mask=m, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + rows, mask=rows < M, other=0.0)
    w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + off, mask=m, other=0.0).to(tl.float32)
    xhat = x * rstd[:, None]
    g = dy * w[None, :]
    dx = rstd[:, None] * (g - xhat * (tl.sum(g * xhat, axis=1) / N)[:, None])
    if HAS_DROUT:
        dx += tl.load(drout_ptr + off, mask=m, other=0.0).to(tl.float32)
    tl.store(dx_ptr + off, dx, mask=m)
    tl.store(dw_ptr + pid * N + cols, tl.sum(dy * xhat, axis=0), mask=cols < N)


@torch.library.custom_op("zoo::add_rms_norm_fwd", mutates_args=())
def _fwd(
    hidden: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, eps: float, residual_in_fp32: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    N = hidden.shape[-1]
    h = hidden.reshape(-1, N).contiguous()
    r = None if residual is None else residual.reshape(-1, N).contiguous()
    M = h.shape[0]
    out = torch.empty_like(h)
    rout = torch.empty((M, N), dtype=torch.float32 if residual_in_fp32 else hidden.dtype, device=h.device)
    rstd = torch.empty((M,), dtype=torch.float32, device=h.device)
    _add_norm_fwd_kernel[(cdiv(M, ROWS),)](
        h, r if r is not None else h, weight, out, rout, rstd, M, N, eps,
        HAS_RES=r is not None, RES_FP32=residual_in_fp32, BLOCK_N=next_power_of_2(N), ROWS_=ROWS,
    )
    return out.view(hidden.shape), rout.view(hidden.shape), rstd


@_fwd.register_fake
def _(hidden, residual, weight, eps, residual_in_fp32):
    M = hidden.numel() // hidden.shape[-1]
    return (
        torch.empty_like(hidden, memory_format=torch.contiguous_format),
        hidden.new_empty(hidden.shape, dtype=torch.float32 if residual_in_fp32 else hidden.dtype),
        hidden.new_empty((M,), dtype=torch.float32),
    )


@torch.library.custom_op("zoo::add_rms_norm_bwd", mutates_args=())
def _bwd(
    rout: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, dy: torch.Tensor, drout: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    N = rout.shape[-1]
    M = rstd.shape[0]
    grid = cdiv(M, ROWS)
    dx = torch.empty((M, N), dtype=torch.float32, device=rout.device)
    dw = torch.empty((grid, N), dtype=torch.float32, device=rout.device)
    _add_norm_bwd_kernel[(grid,)](
        rout.reshape(M, N).contiguous(), weight, rstd, dy.reshape(M, N).contiguous(),
        dx if drout is None else drout.reshape(M, N).contiguous(), dx, dw, M, N,
        HAS_DROUT=drout is not None, BLOCK_N=next_power_of_2(N), ROWS_=ROWS,
    )
    return dx.view(rout.shape), dw.sum(0).to(weight.dtype)


@_bwd.register_fake
def _(rout, weight, rstd, dy, drout):
    return rout.new_empty(rout.shape, dtype=torch.float32), weight.new_empty(weight.shape)


def _setup(ctx, inputs, output):
    hidden, residual, weight, eps, residual_in_fp32 = inputs
    ctx.save_for_backward(output[1], weight, output[2])
    ctx.dtypes = (hidden.dtype, None if residual is None else residual.dtype)


def _backward(ctx, dout, drout, _drstd):
    rout, weight, rstd = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(rout)
    dx, dw = _bwd(rout, weight, rstd, dout, drout)
    h_dtype, r_dtype = ctx.dtypes
    return dx.to(h_dtype), None if r_dtype is None else dx.to(r_dtype), dw, None, None


_fwd.register_autograd(_backward, setup_context=_setup)


def add_rms_norm_triton(
    hidden: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, eps: float = 1e-5,
    residual_in_fp32: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(residual + hidden) in hidden's dtype, the new residual); ``residual`` None starts
    the stream (first block). Same results as ``zoo.core.block.add_norm`` with an RMSNorm and no
    drop path (apply drop path to ``hidden`` first)."""
    if weight.shape != (hidden.shape[-1],):
        raise ValueError(f"add_rms_norm_triton: weight must be ({hidden.shape[-1]},), got {tuple(weight.shape)}")
    if residual is not None and residual.shape != hidden.shape:
        raise ValueError(
            f"add_rms_norm_triton: residual must have hidden's shape {tuple(hidden.shape)}, got {tuple(residual.shape)}"
        )
    out, rout, _ = _fwd(hidden, residual, weight, eps, residual_in_fp32)
    return out, rout
