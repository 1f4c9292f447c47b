"""One decoding step of the selective scan in one kernel: a program owns BLOCK_P channels of one (batch, head)
and the whole d_state row of each, reads the state once, writes the new state and the output once. Strides
are passed as they are, so broadcast A / dt / D (a Mamba-2 head shares them across its channels) cost nothing.
Inference only (no autograd): decoding does not train."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..launch import cdiv, next_power_of_2

BLOCK_P = 16


@triton.jit
def _state_update_kernel(
    s_ptr, x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, d_ptr, z_ptr, db_ptr, out_ptr, ns_ptr,
    P, N, GROUP_RATIO,
    s_sb, s_sh, s_sp, s_sn, s_xb, s_xh, s_xp, s_tb, s_th, s_tp, s_ah, s_ap, s_an,
    s_bb, s_bg, s_bn, s_cb, s_cg, s_cn, s_dh, s_dp, s_zb, s_zh, s_zp, s_qh, s_qp,
    s_ob, s_oh, s_op, s_nb, s_nh, s_np, s_nn,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DB: tl.constexpr, SOFTPLUS: tl.constexpr, SIGNED: tl.constexpr,
    BP: tl.constexpr, BN: tl.constexpr,
):
    b = tl.program_id(2).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0) * BP + tl.arange(0, BP)
    n = tl.arange(0, BN)
    pm, nm = p < P, n < N
    m2 = pm[:, None] & nm[None, :]
    g = h // GROUP_RATIO
    x = tl.load(x_ptr + b * s_xb + h * s_xh + p * s_xp, mask=pm, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + b * s_tb + h * s_th + p * s_tp, mask=pm, other=0.0).to(tl.float32)
    if HAS_DB:
        dt += tl.load(db_ptr + h * s_qh + p * s_qp, mask=pm, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)  # torch's softplus threshold
    A = tl.load(a_ptr + h * s_ah + p[:, None] * s_ap + n[None, :] * s_an, mask=m2, other=0.0).to(tl.float32)
    Bv = tl.load(b_ptr + b * s_bb + g * s_bg + n * s_bn, mask=nm, other=0.0).to(tl.float32)
    Cv = tl.load(c_ptr + b * s_cb + g * s_cg + n * s_cn, mask=nm, other=0.0).to(tl.float32)
    S = tl.load(s_ptr + b * s_sb + h * s_sh + p[:, None] * s_sp + n[None, :] * s_sn, mask=m2, other=0.0).to(tl.float32)
    a = tl.exp(dt[:, None] * A)
    if SIGNED:
        a = 2.0 * a - 1.0
    S = a * S + (dt * x)[:, None] * Bv[None, :]
    y = tl.sum(S * Cv[None, :], axis=1)
    if HAS_D:
        y += tl.load(d_ptr + h * s_dh + p * s_dp, mask=pm, other=0.0).to(tl.float32) * x
    if HAS_Z:
        zv = tl.load(z_ptr + b * s_zb + h * s_zh + p * s_zp, mask=pm, other=0.0).to(tl.float32)
        y = y * zv * tl.sigmoid(zv)
    tl.debug_barrier()  # the new state may be written over the old one: every read before any write
    tl.store(ns_ptr + b * s_nb + h * s_nh + p[:, None] * s_np + n[None, :] * s_nn, S.to(ns_ptr.dtype.element_ty), mask=m2)
    tl.store(out_ptr + b * s_ob + h * s_oh + p * s_op, y.to(out_ptr.dtype.element_ty), mask=pm)


def selective_state_update_triton(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                                  negative_eigenvalues=False, state_out=None):
    """Same contract as ``zoo.core.selective_scan.step.selective_state_update`` (inputs validated there); the new
    state goes into ``state_out`` (which may be ``state`` itself: a program reads its part of the state before it
    writes the same part) or a new tensor."""
    if not state.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"selective_state_update_triton: expected CUDA tensors (or Triton's interpreter, "
                         f"TRITON_INTERPRET=1), got state on {state.device}")
    b, h, P, N = state.shape
    out = torch.empty_like(x)
    if state_out is not None and state_out.shape != state.shape:
        raise ValueError(f"selective_state_update_triton: state_out must be {tuple(state.shape)}, got {tuple(state_out.shape)}")
    new = torch.empty_like(state) if state_out is None else state_out
    dummy = x  # never read: the HAS_* flags are off
    Dt, Zt, Qt = (D if D is not None else dummy), (z if z is not None else dummy), (dt_bias if dt_bias is not None else dummy)
    d_strides = D.stride() if D is not None else (0, 0)
    z_strides = z.stride() if z is not None else (0, 0, 0)
    q_strides = dt_bias.stride() if dt_bias is not None else (0, 0)
    grid = (cdiv(P, BLOCK_P), h, b)
    _state_update_kernel[grid](
        state, x, dt, A, B, C, Dt, Zt, Qt, out, new, P, N, h // B.shape[1],
        *state.stride(), *x.stride(), *dt.stride(), *A.stride(), *B.stride(), *C.stride(), *d_strides, *z_strides,
        *q_strides, *out.stride(), *new.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DB=dt_bias is not None, SOFTPLUS=dt_softplus,
        SIGNED=negative_eigenvalues, BP=BLOCK_P, BN=next_power_of_2(N),
    )
    return out, new
