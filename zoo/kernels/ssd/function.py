"""Launchers and autograd of the Triton SSD scan.

The op works on the final step sizes (``dt`` after bias, softplus and limits; ``zoo.core.ssd`` applies those
in PyTorch, where autograd carries their gradient) and in the (batch, length, heads, headdim) layout.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..launch import cdiv, next_power_of_2
from .kernels import _bwd_chunk_kernel, _bwd_walks_kernel, _channel_dot_kernel, _fwd_kernel, _gate_bwd_kernel

# Chunk length Q of the forward and of the backward (a multiple of the forward's: the forward stores the states
# where the backward's segments start), the headdim blocks of the backward's chunk kernel and of its walks (None:
# the forward's; smaller blocks give the walks more programs), and the warps of each kernel (measured on an H200:
# benchmarks/results/ssd_h200.json, ssd_h200_gated_variants_*.json: 4 backward warps beat 8).
BLOCK_Q = 32
BWD_BLOCK_Q = 32
BWD_BLOCK_P = None
WALK_BLOCK_P = None
FWD_WARPS = 4
BWD_WARPS = 4
# Software-pipelining stages of the backward chunk kernel's loop over heads (where the headdim is one block).
BWD_STAGES = 1
# The backward's chunk kernel has (chunks x batch x groups x splits) programs; the group's heads are split
# until there are about this many, each split summing its heads' dB / dC in registers.
TARGET_PROGRAMS = 128
# The backward's per-segment chunk states and their gradients: float32 (else x's dtype for half inputs), and
# together at most SEGMENT_MEMORY times the size of x.
STATE_FP32 = False
SEGMENT_MEMORY = 1.0
# With the z gate, training stores the output before the gate (x's size) so that the backward's dz is one
# elementwise product; without it the backward recomputes that output in its chunk kernel (two more dots per head).
STORE_UNGATED = True
# With the ungated output stored: the gate's backward as one elementwise kernel before the scan's (which then runs
# its ungated variant on dout silu(z)) instead of inside the backward's walk and chunk kernels.
GATE_PREPASS = True
# D's gradient (sum over batch and length of dout x per channel) by its own reduction kernel instead of a reduction
# over each chunk's steps inside the backward's chunk kernel (which then only adds D dy to dx); needs the ungated
# dout, so not with the gate inside the backward kernels. Off until it has been compiled and timed on a GPU (the
# interpreter tests pass): the in-kernel reduction costs the chunk kernel about 0.5 ms at the reference shape.
DD_SEPARATE = False


def _blocks(P: int, N: int):
    bn = max(16, next_power_of_2(N))
    bp = max(16, min(next_power_of_2(P), 64 if bn <= 128 else 16))
    return bp, bn


def _chunk_lengths(N: int) -> tuple[int, int]:
    """The forward's and the backward's chunk lengths."""
    if N > 128:
        return 16, 16  # d_state 256: smaller tiles fit the shared memory
    if BWD_BLOCK_Q % BLOCK_Q:
        raise ValueError(f"BWD_BLOCK_Q must be a multiple of BLOCK_Q, got {BWD_BLOCK_Q} and {BLOCK_Q}")
    return BLOCK_Q, BWD_BLOCK_Q


def _splits(heads_per_group: int, programs: int) -> int:
    split = 1
    while programs * split < TARGET_PROGRAMS and split < heads_per_group:
        split += 1
        while heads_per_group % split:
            split += 1
    return split


def _state_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if STATE_FP32 or x.dtype == torch.float32 else x.dtype


def _segment_chunks(L: int, N: int, Q: int, state_bytes: int = 2, x_bytes: int = 2) -> int:
    """Chunks per segment of the backward: a segment's chunk states and their gradients (2 x (chunks + 1)
    states of N values per channel) take at most SEGMENT_MEMORY times the memory of x (L values per channel)."""
    return max(1, min(cdiv(L, Q), int(SEGMENT_MEMORY * L * x_bytes) // (2 * N * state_bytes) - 1))


def _common(x, B):
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    bp, bn = _blocks(P, N)
    return b, L, H, P, G, N, bp, bn


class _SSDFunction(torch.autograd.Function):
    """Training keeps only the states at segment starts; the backward walks the segments from the last,
    recomputing each one's chunk states, then the gradients of the states leaving its chunks, then every chunk's
    gradients at once."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, initial_state, reverse, signed, block_q, bwd_block_q):
        b, L, H, P, G, N, bp, bn = _common(x, B)
        Q = block_q
        NC = cdiv(L, Q)
        x, dt, B, C = x.contiguous(), dt.contiguous(), B.contiguous(), C.contiguous()
        z = None if z is None else z.contiguous()
        A = A.float().contiguous()
        D = None if D is None else D.float().contiguous()
        init = None if initial_state is None else initial_state.float().contiguous()
        train = any(ctx.needs_input_grad)
        # segments of seg backward chunks, each starting at a state the forward stores
        seg = _segment_chunks(L, N, bwd_block_q, _state_dtype(x).itemsize, x.element_size())
        nseg = cdiv(L, seg * bwd_block_q)
        out = torch.empty_like(x)
        ungated = torch.empty_like(x) if train and z is not None and STORE_UNGATED else None
        final = torch.empty((b, H, P, N), dtype=torch.float32, device=x.device)
        starts = torch.empty((b, nseg + 1, H, P, N) if train else (1,), dtype=torch.float32, device=x.device)
        _fwd_kernel[(H * cdiv(P, bp), b)](
            x, dt, A, B, C, D if D is not None else x, z if z is not None else x, init if init is not None else final,
            out, ungated if ungated is not None else out, final, starts, L, H, P, N, G, H // G, 0, NC,
            seg * (bwd_block_q // Q), nseg + 1, H * P * N,
            Q=Q, BP=bp, BN=bn, HAS_D=D is not None, D_PER_CHANNEL=D is not None and D.dim() == 2,
            HAS_Z=z is not None, HAS_INIT=init is not None, STORE_STATES=train,
            STORE_UNGATED=ungated is not None, REVERSE=reverse,
            SIGNED=signed, IEEE=x.dtype == torch.float32, num_warps=FWD_WARPS,
        )
        if train:
            ctx.save_for_backward(x, dt, A, B, C, D, z, ungated, starts)
            ctx.cfg = (reverse, signed, bwd_block_q, seg, initial_state is not None)
        return out, final

    @staticmethod
    def backward(ctx, dout, dfinal):
        x, dt, A, B, C, D, z, ungated, starts = ctx.saved_tensors
        reverse, signed, Q, seg, has_init = ctx.cfg
        b, L, H, P, G, N, bp, bn = _common(x, B)
        bp_chunk = min(BWD_BLOCK_P, bp) if BWD_BLOCK_P else bp
        bp_walk = min(WALK_BLOCK_P, bp) if WALK_BLOCK_P else bp
        NC = cdiv(L, Q)
        hpg = H // G
        dev = x.device
        dout = dout.contiguous()
        dz = None if z is None else torch.empty_like(z)
        if ungated is not None and GATE_PREPASS:
            gated_dout = torch.empty_like(dout)
            n = dout.numel()
            _gate_bwd_kernel[(cdiv(n, 1024),)](dout, z, ungated, gated_dout, dz, n, BLOCK=1024)
            dout, z, ungated = gated_dout, None, None  # the scan's backward without the gate
        state_dtype = _state_dtype(x)
        ieee = x.dtype == torch.float32
        dummy_D, dummy_z = (D if D is not None else x), (z if z is not None else x)
        dcarry = torch.zeros((b, H, P, N), dtype=torch.float32, device=dev) if dfinal is None \
            else dfinal.float().clone(memory_format=torch.contiguous_format)
        scratch = torch.empty((b, H, P, N), dtype=torch.float32, device=dev)
        states = torch.empty(b * (seg + 1) * H * P * N, dtype=state_dtype, device=dev)
        dstates = torch.empty(b * seg * H * P * N, dtype=state_dtype, device=dev)
        nsplit = _splits(hpg, seg * b * G)
        parts = torch.empty((2, nsplit * b * seg * Q * G * N), dtype=torch.float32, device=dev)
        dx = torch.empty_like(x)
        ddt = torch.empty((b, L, H), dtype=torch.float32, device=dev)
        dB = torch.empty((b, L, G, N), dtype=torch.float32, device=dev)
        dC = torch.empty_like(dB)
        dA = torch.empty((b, NC, H), dtype=torch.float32, device=dev)
        dd_separate = D is not None and z is None and DD_SEPARATE
        dD = None if D is None or dd_separate else torch.empty((b, NC, H, P), dtype=torch.float32, device=dev)
        common = dict(Q=Q, BN=bn, HAS_D=D is not None, D_PER_CHANNEL=D is not None and D.dim() == 2,
                      STORE_DD=not dd_separate,
                      HAS_Z=z is not None, LOAD_UNGATED=ungated is not None, REVERSE=reverse, SIGNED=signed,
                      IEEE=ieee)
        for s in reversed(range(cdiv(NC, seg))):
            c0, ncs = s * seg, min(seg, NC - s * seg)
            _bwd_walks_kernel[(H * cdiv(P, bp_walk), b, 2)](
                x, dt, A, B, C, dummy_D, starts[:, s], scratch, states, starts.stride(0), dout, dummy_z, dcarry,
                dstates, L, H, P, N, G, hpg, c0, ncs, Q=Q, BP=bp_walk, BN=bn, HAS_Z=z is not None, REVERSE=reverse,
                SIGNED=signed, IEEE=ieee, num_warps=FWD_WARPS,
            )
            _bwd_chunk_kernel[(ncs, b, G * nsplit)](
                x, dt, A, B, C, dummy_D, dummy_z, ungated if ungated is not None else x, dout, states, dstates,
                dx, ddt, parts[0], parts[1], dA, dD if dD is not None else dA, dz if z is not None else dx,
                L, H, P, N, G, hpg, NC, c0, ncs, nsplit, hpg // nsplit,
                BP=bp_chunk, ONE_BLOCK=bp_chunk >= P, STAGES=BWD_STAGES if bp_chunk >= P else 1,
                num_warps=BWD_WARPS, **common,
            )
            rows = min(ncs * Q, L - c0 * Q)  # the segment's steps, in walk order
            for part, grad in zip(parts, (dB, dC)):
                got = part[: nsplit * b * ncs * Q * G * N].view(nsplit, b, ncs * Q, G, N)[:, :, :rows].sum(0)
                if reverse:
                    grad[:, L - c0 * Q - rows: L - c0 * Q] = got.flip(1)
                else:
                    grad[:, c0 * Q: c0 * Q + rows] = got
        if dd_separate:
            rows, cols, per = b * L, H * P, 512
            dD = torch.empty((cdiv(rows, per), cols), dtype=torch.float32, device=dev)
            _channel_dot_kernel[(dD.shape[0], cdiv(cols, 128))](dout, x, dD, rows, cols, ROWS=per, BR=32, BC=128)
            dD = dD.sum(0).view(H, P)
        elif dD is not None:
            dD = dD.sum((0, 1))
        if dD is not None and D.dim() == 1:
            dD = dD.sum(1)
        return dx, ddt, dA.sum((0, 1)), dB, dC, dD, dz, dcarry if has_init else None, None, None, None, None


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
    (a power of two, at least 16) overrides the chunk length of both directions."""
    fwd_q, bwd_q = (block_q, block_q) if block_q else _chunk_lengths(B.shape[-1])
    out, final = _SSDFunction.apply(x, dt, A, B, C, D, z, initial_state, reverse, negative_eigenvalues,
                                    fwd_q, bwd_q)
    return out, final
