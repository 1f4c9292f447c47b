"""One decoding step of the causal depthwise conv1d (mamba-ssm's ``causal_conv1d_update`` semantics) in one
kernel: out = act(bias + sum_j w[j] window[j]) over the window (the k - 1 previous inputs, then x), and the
state shifted by one step. A program owns BLOCK_D channels of one sequence; it loads every row of its window
before it stores any (a barrier between), so the new state may be written over the old one. Inference only (no autograd)."""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ..launch import cdiv, next_power_of_2

BLOCK_D = 128


@triton.jit
def _conv_update_kernel(
    x_ptr, s_ptr, w_ptr, b_ptr, out_ptr, ns_ptr, D,
    s_xb, s_xd, s_sb, s_sk, s_sd, s_wd, s_wk, s_ob, s_od, s_nb, s_nk, s_nd,
    KSIZE: tl.constexpr, KP: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BD: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    d = tl.program_id(0) * BD + tl.arange(0, BD)
    dm = d < D
    j = tl.arange(0, KP)[:, None]  # the state's rows: the k - 1 previous inputs, oldest first
    sm = (j < KSIZE - 1) & dm[None, :]
    S = tl.load(s_ptr + b * s_sb + j * s_sk + d[None, :] * s_sd, mask=sm, other=0.0)
    W = tl.load(w_ptr + d[None, :] * s_wd + j * s_wk, mask=sm, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + b * s_xb + d * s_xd, mask=dm, other=0.0)
    acc = tl.sum(W * S.to(tl.float32), 0)
    acc += tl.load(w_ptr + d * s_wd + (KSIZE - 1) * s_wk, mask=dm, other=0.0).to(tl.float32) * x.to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + d, mask=dm, other=0.0).to(tl.float32)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(out_ptr + b * s_ob + d * s_od, acc.to(out_ptr.dtype.element_ty), mask=dm)
    tl.debug_barrier()  # every row read before any is overwritten: the new state may be the old one's memory
    tl.store(ns_ptr + b * s_nb + (j - 1) * s_nk + d[None, :] * s_nd, S.to(ns_ptr.dtype.element_ty), mask=sm & (j >= 1))
    if KSIZE > 1:
        tl.store(ns_ptr + b * s_nb + (KSIZE - 2) * s_nk + d * s_nd, x.to(ns_ptr.dtype.element_ty), mask=dm)


def causal_conv1d_update_triton(
    x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
    activation: Optional[str] = None, state_out: Optional[torch.Tensor] = None,
):
    """x (batch, dim); conv_state (batch, k - 1, dim), the previous inputs, oldest first; weight (dim, k) or
    nn.Conv1d's (dim, 1, k); bias (dim,) or None; activation None or "silu". Returns (out (batch, dim) in x's
    dtype, the new state): written into ``state_out`` (which may be ``conv_state`` itself) or a new tensor."""
    if activation not in (None, "silu"):
        raise ValueError(f"causal_conv1d_update_triton: activation must be None or 'silu', got {activation!r}")
    if weight.dim() == 3:
        weight = weight[:, 0]
    b, dim = x.shape if x.dim() == 2 else (None, None)
    k = weight.shape[-1]
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[0] != dim or conv_state.shape != (b, k - 1, dim):
        raise ValueError(
            f"causal_conv1d_update_triton: expected x (batch, dim), weight (dim, k) and conv_state (batch, k - 1, dim), "
            f"got x {tuple(x.shape)}, weight {tuple(weight.shape)}, conv_state {tuple(conv_state.shape)}"
        )
    if bias is not None and bias.shape != (dim,):
        raise ValueError(f"causal_conv1d_update_triton: bias must be ({dim},), got {tuple(bias.shape)}")
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"causal_conv1d_update_triton: expected CUDA tensors (or Triton's interpreter, "
                         f"TRITON_INTERPRET=1), got x on {x.device}")
    if state_out is None:
        state_out = torch.empty_like(conv_state)
    elif state_out.shape != conv_state.shape:
        raise ValueError(f"causal_conv1d_update_triton: state_out must be {tuple(conv_state.shape)}, got {tuple(state_out.shape)}")
    out = torch.empty_like(x)
    _conv_update_kernel[(cdiv(dim, BLOCK_D), b)](
        x, conv_state, weight, bias if bias is not None else weight, out, state_out, dim,
        *x.stride(), *conv_state.stride(), *weight.stride(), *out.stride(), *state_out.stride(),
        KSIZE=k, KP=max(1, next_power_of_2(k - 1)), HAS_BIAS=bias is not None, SILU=activation == "silu", BD=BLOCK_D,
    )
    return out, state_out
