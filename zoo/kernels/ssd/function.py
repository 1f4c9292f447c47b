"""Launchers and autograd of the Triton SSD scan.

The op works on the final step sizes (``dt`` after bias, softplus and limits; ``zoo.core.ssd`` applies those
in PyTorch, where autograd carries their gradient) and in the (batch, length, heads, headdim) layout.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..launch import cdiv, next_power_of_2
from .kernels import _bwd_chunk_kernel, _bwd_dstate_kernel, _fwd_kernel

# Chunk length Q, and the warps of each kernel (tuned on an H200: benchmarks/results/ssd_h200.json).
BLOCK_Q = 64
FWD_WARPS = 4
BWD_WARPS = 8
# The backward's chunk kernel has (chunks x batch x groups x splits) programs; the group's heads are split
# until there are about this many, each split summing its heads' dB / dC in registers.
TARGET_PROGRAMS = 1024


def _blocks(P: int, N: int):
    bn = max(16, next_power_of_2(N))
    bp = max(16, min(next_power_of_2(P), 64 if bn <= 128 else 32))
    return bp, bn


def _splits(heads_per_group: int, programs: int) -> int:
    split = 1
    while programs * split < TARGET_PROGRAMS and split < heads_per_group:
        split += 1
        while heads_per_group % split:
            split += 1
    return split


class _SSDFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, initial_state, reverse, signed, block_q):
        b, L, H, P = x.shape
        G, N = B.shape[2], B.shape[3]
        Q = block_q
        NC = cdiv(L, Q)
        bp, bn = _blocks(P, N)
        x, dt, B, C = x.contiguous(), dt.contiguous(), B.contiguous(), C.contiguous()
        z = None if z is None else z.contiguous()
        A = A.float().contiguous()
        D = None if D is None else D.float().contiguous()
        init = None if initial_state is None else initial_state.float().contiguous()
        train = any(ctx.needs_input_grad)
        state_dtype = torch.float32 if x.dtype == torch.float32 else x.dtype
        out = torch.empty_like(x)
        final = torch.empty((b, H, P, N), dtype=torch.float32, device=x.device)
        states = torch.empty((b, NC + 1, H, P, N) if train else (1,), dtype=state_dtype, device=x.device)
        _fwd_kernel[(H * cdiv(P, bp), b)](
            x, dt, A, B, C, D if D is not None else x, z if z is not None else x, init if init is not None else final,
            out, final, states, L, H, P, N, G, H // G, NC,
            Q=Q, BP=bp, BN=bn, HAS_D=D is not None, D_PER_CHANNEL=D is not None and D.dim() == 2,
            HAS_Z=z is not None, HAS_INIT=init is not None, STORE_STATES=train, REVERSE=reverse, SIGNED=signed,
            IEEE=x.dtype == torch.float32, num_warps=FWD_WARPS,
        )
        if train:
            ctx.save_for_backward(x, dt, A, B, C, D, z, states)
            ctx.cfg = (reverse, signed, Q, initial_state is not None)
        ctx.mark_non_differentiable(states)
        return out, final

    @staticmethod
    def backward(ctx, dout, dfinal):
        x, dt, A, B, C, D, z, states = ctx.saved_tensors
        reverse, signed, Q, has_init = ctx.cfg
        b, L, H, P = x.shape
        G, N = B.shape[2], B.shape[3]
        NC = cdiv(L, Q)
        bp, bn = _blocks(P, N)
        dout = dout.contiguous()
        dfinal = None if dfinal is None else dfinal.float().contiguous()
        dev = x.device
        dstates = torch.empty((b, NC, H, P, N), dtype=states.dtype, device=dev)
        dinit = torch.empty((b, H, P, N), dtype=torch.float32, device=dev)
        _bwd_dstate_kernel[(H * cdiv(P, bp), b)](
            dout, dt, A, C, z if z is not None else x, dfinal if dfinal is not None else dinit, dstates, dinit,
            L, H, P, N, G, H // G, NC,
            Q=Q, BP=bp, BN=bn, HAS_Z=z is not None, HAS_DFINAL=dfinal is not None, REVERSE=reverse, SIGNED=signed,
            IEEE=x.dtype == torch.float32, num_warps=FWD_WARPS,
        )
        hpg = H // G
        nsplit = _splits(hpg, NC * b * G)
        dx = torch.empty_like(x)
        ddt = torch.empty((b, L, H), dtype=torch.float32, device=dev)
        dB = torch.empty((nsplit, b, L, G, N), dtype=torch.float32, device=dev)
        dC = torch.empty_like(dB)
        dz = None if z is None else torch.empty_like(z)
        dA = torch.empty((b, NC, H), dtype=torch.float32, device=dev)
        dD = None if D is None else torch.empty((b, NC, H, P), dtype=torch.float32, device=dev)
        _bwd_chunk_kernel[(NC, b, G * nsplit)](
            x, dt, A, B, C, D if D is not None else x, z if z is not None else x, dout, states, dstates,
            dx, ddt, dB, dC, dz if dz is not None else dx, dA, dD if dD is not None else dA,
            L, H, P, N, G, hpg, NC, nsplit, hpg // nsplit,
            Q=Q, BP=bp, BN=bn, HAS_D=D is not None, D_PER_CHANNEL=D is not None and D.dim() == 2,
            HAS_Z=z is not None, REVERSE=reverse, SIGNED=signed, IEEE=x.dtype == torch.float32, num_warps=BWD_WARPS,
        )
        dB = dB.sum(0) if nsplit > 1 else dB[0]
        dC = dC.sum(0) if nsplit > 1 else dC[0]
        if dD is not None:
            dD = dD.sum((0, 1))
            if D.dim() == 1:
                dD = dD.sum(1)
        return dx, ddt, dA.sum((0, 1)), dB, dC, dD, dz, dinit if has_init else None, None, None, None


def ssd_scan_triton(
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
    block_q: Optional[int] = None,
):
    """The SSD scan on final step sizes ``dt`` (float32), unpacked: returns (out in x's dtype, float32 final
    state (batch, nheads, headdim, d_state)). Arguments are checked by ``zoo.core.ssd.ssd_scan``; ``block_q``
    (a power of two, at least 16) overrides the chunk length."""
    out, final = _SSDFunction.apply(x, dt, A, B, C, D, z, initial_state, reverse, negative_eigenvalues,
                                    block_q or BLOCK_Q)
    return out, final
