"""Fused CPU selective scan (numba): the state stays in a small per-channel buffer, never (b, l, d, n).

One compiled loop per channel walks the sequence with the d_state-wide state in L1 and reads out y in
the same step. With gradients the forward also keeps the state every ``CHECKPOINT`` steps; the backward
reruns each CHECKPOINT-step span from its saved state (transitions and states into a CHECKPOINT x
d_state buffer) and then walks it backwards. Memory beyond the inputs and outputs: the checkpoints
(b, d, l / CHECKPOINT, n) and, in the backward, B and C gradient partials (splits, b, l, groups, n).

numba ships prebuilt wheels, so this needs no C++ compiler; without numba (``pip install mamba-zoo``
without the ``cpu`` extra) ``available()`` is False and the op keeps the chunked PyTorch path.
Kernels compile on first use (seconds) and are cached on disk.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

try:
    import numba
    from llvmlite import ir
    from numba import njit, prange
    from numba.core import types
    from numba.extending import intrinsic, overload
except ImportError:  # the optional 'cpu' extra is not installed
    numba = None

CHECKPOINT = 64  # steps between saved states: the backward's per-channel buffer is CHECKPOINT x d_state


def available() -> bool:
    return numba is not None


if numba is not None:

    @intrinsic
    def _f32_from_bits(typingctx, bits):
        # exp's 2**n factor built from its bits; a plain bitcast keeps the state loop vectorizable.
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.FloatType())

        return types.float32(types.int32), codegen

    def fast_exp(x):
        raise NotImplementedError  # typed by the overload below

    @overload(fast_exp, fastmath=True)
    def _fast_exp(x):
        # float32: Cephes' expf (range reduction by ln 2 in two parts, degree-5 polynomial, about 1 ulp),
        # branch-free so that LLVM vectorizes the d_state loop; glibc's scalar expf would be the whole cost.
        # float64: math.exp, exact.
        if x != types.float32:
            return lambda x: math.exp(x)
        lo, hi = np.float32(-87.33654), np.float32(88.72283)
        log2e, c1, c2 = np.float32(1.44269504088896341), np.float32(0.693359375), np.float32(-2.12194440e-4)
        p0, p1, p2 = np.float32(1.9875691500e-4), np.float32(1.3981999507e-3), np.float32(8.3334519073e-3)
        p3, p4, p5 = np.float32(4.1665795894e-2), np.float32(1.6666665459e-1), np.float32(5.0000001201e-1)
        one, half = np.float32(1.0), np.float32(0.5)

        def impl(x):
            x = min(max(x, lo), hi)
            k = np.float32(math.floor(x * log2e + half))
            r = x - k * c1 - k * c2
            p = ((((p0 * r + p1) * r + p2) * r + p3) * r + p4) * r + p5
            p = p * r * r + r + one
            return p * _f32_from_bits(np.int32((np.int32(k) + np.int32(127)) << np.int32(23)))

        return impl

    _FLAGS = {"contract", "reassoc", "nsz", "arcp", "afn"}  # no nnan / ninf: infinities stay honest

    @njit(parallel=True, cache=True, fastmath=_FLAGS)
    def _forward(u, dts_in, z, A, D, B, C, h0, segs, chunk0, out, last, chk, reverse, signed, has_D, has_z, save):
        batch, dim, _ = u.shape
        n = A.shape[1]
        nseg = segs.shape[0]
        per_b, per_c = dim // B.shape[2], dim // C.shape[2]
        sa, sb = (2, -1) if signed else (1, 0)  # transition sa * exp(dt A) + sb
        for w in prange(batch * dim):
            bi, d = w // dim, w % dim
            gb, gc = d // per_b, d // per_c
            h = np.empty(n, u.dtype)
            Ad = A[d]
            for s in range(nseg):
                st = bi * nseg + s
                h[:] = h0[st, d]
                start, end = segs[s, 0], segs[s, 1]
                for i in range(end - start):
                    t = end - 1 - i if reverse else start + i
                    if save and i % CHECKPOINT == 0:
                        chk[bi, d, chunk0[s] + i // CHECKPOINT] = h
                    dt = dts_in[bi, d, t]
                    ut = u[bi, d, t]
                    dtu = dt * ut
                    Bt, Ct = B[bi, t, gb], C[bi, t, gc]
                    y = ut * 0
                    for k in range(n):
                        a = sa * fast_exp(dt * Ad[k]) + sb
                        hk = a * h[k] + dtu * Bt[k]
                        h[k] = hk
                        y += Ct[k] * hk
                    if has_D:
                        y += D[d] * ut
                    if has_z:
                        zt = z[bi, d, t]
                        y *= zt / (1 + math.exp(-zt))
                    out[bi, d, t] = y
                last[st, d] = h

    @njit(parallel=True, cache=True, fastmath=_FLAGS)
    def _backward(u, dts_in, z, A, D, B, C, segs, chunk0, chk, gout, glast,
                  gu, gdt_out, gz, gA, gD, gB, gC, gh0, reverse, signed, has_D, has_z):
        batch, dim, _ = u.shape
        n = A.shape[1]
        nseg = segs.shape[0]
        nsplit = gB.shape[0]
        span = (dim + nsplit - 1) // nsplit
        per_b, per_c = dim // B.shape[2], dim // C.shape[2]
        sa, sb = (2, -1) if signed else (1, 0)
        for w in prange(batch * nsplit):
            bi, j = w // nsplit, w % nsplit
            hs = np.empty((CHECKPOINT + 1, n), u.dtype)  # states of one span, hs[0] its start
            As = np.empty((CHECKPOINT, n), u.dtype)      # transitions of one span
            dts = np.empty(CHECKPOINT, u.dtype)
            carry = np.empty(n, u.dtype)                 # a_{t+1} dh_{t+1}, arriving at step t
            gAd = np.empty(n, u.dtype)
            for d in range(j * span, min(dim, (j + 1) * span)):
                gb, gc = d // per_b, d // per_c
                Ad = A[d]
                gAd[:] = 0
                gDd = Ad[0] * 0
                Dd = D[d] if has_D else gDd
                for s in range(nseg - 1, -1, -1):
                    st = bi * nseg + s
                    start, end = segs[s, 0], segs[s, 1]
                    L = end - start
                    carry[:] = glast[st, d]
                    for c in range((L + CHECKPOINT - 1) // CHECKPOINT - 1, -1, -1):
                        i0 = c * CHECKPOINT
                        i1 = min(L, i0 + CHECKPOINT)
                        hs[0] = chk[bi, d, chunk0[s] + c]
                        for i in range(i0, i1):  # rerun the span from its saved state
                            t = end - 1 - i if reverse else start + i
                            dt = dts_in[bi, d, t]
                            dts[i - i0] = dt
                            dtu = dt * u[bi, d, t]
                            Bt = B[bi, t, gb]
                            for k in range(n):
                                a = sa * fast_exp(dt * Ad[k]) + sb
                                As[i - i0, k] = a
                                hs[i - i0 + 1, k] = a * hs[i - i0, k] + dtu * Bt[k]
                        for i in range(i1 - 1, i0 - 1, -1):  # and walk it backwards
                            t = end - 1 - i if reverse else start + i
                            r = i - i0
                            dt, ut, g = dts[r], u[bi, d, t], gout[bi, d, t]
                            dtu = dt * ut
                            Bt, Ct = B[bi, t, gb], C[bi, t, gc]
                            gBt, gCt = gB[j, bi, t, gb], gC[j, bi, t, gc]
                            h, hp, a = hs[r + 1], hs[r], As[r]
                            if has_z:
                                y = Dd * ut
                                for k in range(n):
                                    y += Ct[k] * h[k]
                                zt = z[bi, d, t]
                                sz = 1 / (1 + math.exp(-zt))
                                gz[bi, d, t] = g * y * sz * (1 + zt * (1 - sz))
                                g = g * zt * sz
                            gDd += g * ut
                            gdtu = g * 0
                            gdt = g * 0
                            for k in range(n):
                                dh = carry[k] + Ct[k] * g
                                gCt[k] += h[k] * g
                                gBt[k] += dh * dtu
                                gdtu += dh * Bt[k]
                                gdtA = dh * hp[k] * (a[k] - sb)
                                gdt += gdtA * Ad[k]
                                gAd[k] += gdtA * dt
                                carry[k] = a[k] * dh
                            gu[bi, d, t] = g * Dd + gdtu * dt
                            gdt_out[bi, d, t] = gdt + gdtu * ut
                    gh0[st, d] = carry
                gA[bi, d] = gAd
                gD[bi, d] = gDd


def _segments(length: int, cu_seqlens: Optional[torch.Tensor]):
    """(nseg, 2) start/end per sequence and the index of each sequence's first checkpoint."""
    if cu_seqlens is None:
        bounds = [0, length]
    else:
        bounds = [int(v) for v in cu_seqlens.tolist()]
    segs = np.array(list(zip(bounds[:-1], bounds[1:])), dtype=np.int64).reshape(-1, 2)
    spans = (segs[:, 1] - segs[:, 0] + CHECKPOINT - 1) // CHECKPOINT
    chunk0 = np.concatenate([[0], np.cumsum(spans)[:-1]]).astype(np.int64)
    return segs, chunk0, int(spans.sum())


def _num_splits(batch: int, dim: int) -> int:
    # Enough (batch, channel block) work items to keep every thread busy; each split keeps its own B and C
    # gradient partial of size (b, l, groups, n), summed afterwards.
    return max(1, min(dim, -(-8 * numba.get_num_threads() // batch)))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def _as_groups(BC: torch.Tensor) -> torch.Tensor:
    return BC.unsqueeze(2) if BC.dim() == 3 else BC


class _FusedScan(torch.autograd.Function):
    """The recurrence, D and the z gate on (b, d, l) tensors in the accumulation dtype; dt arrives after
    delta_bias and softplus (elementwise, left to torch and its autograd)."""

    @staticmethod
    def forward(ctx, u, dt, A, B, C, D, z, h0, reverse, signed, cu_seqlens):
        batch, dim, length = u.shape
        n = A.shape[1]
        segs, chunk0, nchunks = _segments(length, cu_seqlens)
        save = any(ctx.needs_input_grad)
        out = torch.empty_like(u)
        last = A.new_empty(batch * segs.shape[0], dim, n)
        chk = A.new_empty(batch, dim, nchunks if save else 0, n)
        z_ = z if z is not None else u[:, :, :0]
        D_ = D if D is not None else A.new_zeros(dim)
        h0_ = h0 if h0 is not None else A.new_zeros(last.shape)
        _set_threads()
        _forward(_np(u), _np(dt), _np(z_), _np(A), _np(D_), _np(B), _np(C), _np(h0_), segs, chunk0,
                 _np(out), _np(last), _np(chk), reverse, signed, D is not None, z is not None, save)
        if save:
            ctx.save_for_backward(u, dt, z_, A, D_, B, C, chk)
            ctx.cfg = (reverse, signed, segs, chunk0, D is not None, z is not None)
        return out, last

    @staticmethod
    def backward(ctx, gout, glast):
        u, dt, z, A, D, B, C, chk = ctx.saved_tensors
        reverse, signed, segs, chunk0, has_D, has_z = ctx.cfg
        batch, dim, _ = u.shape
        _set_threads()
        nsplit = _num_splits(batch, dim)
        gu, gdt, gz = torch.empty_like(u), torch.empty_like(u), torch.empty_like(z)
        gA, gD = A.new_empty(batch, *A.shape), A.new_empty(batch, dim)
        gB, gC = B.new_zeros(nsplit, *B.shape), C.new_zeros(nsplit, *C.shape)
        gh0 = torch.empty_like(glast)
        _backward(_np(u), _np(dt), _np(z), _np(A), _np(D), _np(B), _np(C), segs, chunk0, _np(chk),
                  _np(gout.contiguous()), _np(glast.contiguous()), _np(gu), _np(gdt), _np(gz), _np(gA), _np(gD),
                  _np(gB), _np(gC), _np(gh0), reverse, signed, has_D, has_z)
        return (gu, gdt, gA.sum(0), gB.sum(0), gC.sum(0), gD.sum(0) if has_D else None,
                gz if has_z else None, gh0 if ctx.needs_input_grad[7] else None, None, None, None)


def _set_threads() -> None:
    # follow torch.set_num_threads, within the pool numba started with
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def selective_scan_cpu(
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
    cu_seqlens: Optional[torch.Tensor] = None,
    negative_eigenvalues: bool = False,
):
    """Same contract as :func:`zoo.core.selective_scan.selective_scan` (inputs validated there), packed
    sequences handled natively: the state restarts at every ``cu_seqlens`` boundary."""
    if numba is None:
        raise RuntimeError("selective_scan: the fused CPU scan needs numba; pip install 'mamba-zoo[cpu]'")
    acc = torch.float64 if u.dtype == torch.float64 else torch.float32
    chan = lambda t: None if t is None else t.to(acc).transpose(1, 2).contiguous()  # noqa: E731  (b, d, l)
    dt = delta.to(acc)
    if delta_bias is not None:
        dt = dt + delta_bias.to(acc)
    if delta_softplus:
        dt = F.softplus(dt)
    cont = lambda t: None if t is None else t.to(acc).contiguous()  # noqa: E731
    out, last = _FusedScan.apply(
        chan(u), chan(dt), cont(A), cont(_as_groups(B)), cont(_as_groups(C)), cont(D), chan(z), cont(initial_state),
        bool(reverse), bool(negative_eigenvalues), cu_seqlens,
    )
    out = out.transpose(1, 2).to(u.dtype)
    return (out, last) if return_last_state else out
