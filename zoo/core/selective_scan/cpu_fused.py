"""Fused CPU selective scan (numba): the state stays in a small per-block buffer, never (b, l, d, n).

One compiled loop per (sequence, block of W channels) walks the time steps with the block's
d_state x W state in L1 and reads out y in the same step; the inner loop runs over the W channels, which
are contiguous in the (batch, length, dim) layout, so it vectorizes (exp included) and needs no transpose.
With gradients the forward also keeps the state every ``CHECKPOINT`` steps; the backward reruns each
CHECKPOINT-step span from its saved state (its transitions and states into a CHECKPOINT x d_state x W
buffer) and walks it backwards. Memory beyond the inputs and outputs: the checkpoints
(b, l / CHECKPOINT, n, d), with z the output before the gate (b, l, d), and in the backward, B and C gradient partials (splits, b, l, groups, n).

numba ships prebuilt wheels, so this needs no C++ compiler; without numba (``pip install mamba-zoo``
without the ``cpu`` extra) ``available()`` is False and the op keeps the chunked PyTorch path.
Kernels compile on first use (15-45 s on the 2-core development machine) and are cached on disk beside
this file (or in numba's user cache directory when that is not writable).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

try:
    import numba
    from llvmlite import ir
    from numba import njit, prange
    from numba.core import types
    from numba.extending import intrinsic, overload
except ImportError:  # the optional 'cpu' extra is not installed
    numba = None

CHECKPOINT = 64  # steps between saved states: the backward's buffer is CHECKPOINT x d_state x W
W = 16  # channels per block: the vectorized inner loop


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

    @njit(inline="always")
    def gate_backward(g, zl, ypl, gzl, one, lanes):
        """The z gate's backward over a block's ``lanes`` (= W) lanes (both fused scans): gzl = g * d(y silu(z))/dz
        with y the ungated output ypl, and g becomes the gradient of y, g silu(z). Padding lanes have g = z = 0.
        A ``lanes`` LLVM cannot fold keeps this a loop that vectorizes (see _forward)."""
        for c in range(lanes):
            sz = one / (one + fast_exp(-zl[c]))
            gzl[c] = g[c] * ypl[c] * sz * (one + zl[c] * (one - sz))
            g[c] *= zl[c] * sz

    # The heavy loops run over exactly W lanes of block-local buffers (a trip count LLVM knows, so it
    # vectorizes them whole; not the gate's loops, which it left scalar after unrolling them: see ``lanes``); a
    # narrower block leaves its extra lanes at zero (dt 0, state 0), which stay zero. Channel indices into the
    # inputs are unsigned (the block table is uint64): a signed index goes through numba's negative-index
    # wraparound, which turns vector loads into gathers. ``one`` carries the float type, so that no integer
    # constant promotes float32 arithmetic to float64.

    @njit(parallel=True, cache=True, fastmath=_FLAGS, error_model="numpy")
    def _forward(u, dt, z, At, D, B, C, h0, segs, chunk0, blocks, out, last, chk, ypre,
                 reverse, signed, has_D, has_z, save, one):
        batch, n = u.shape[0], At.shape[0]
        nseg, nblk = segs.shape[0], blocks.shape[0]
        zero = one - one
        sa, sb = (one + one, -one) if signed else (one, zero)  # transition sa * exp(dt A) + sb
        # W as a trip count LLVM cannot fold, for the gate's loop: fully unrolled for a known W it stayed scalar code
        # (16 scalar expf and divisions per step); as a loop it vectorizes.
        lanes = W if nblk > 0 else 0
        for w in prange(batch * nblk):
            bi, q = w // nblk, w % nblk
            c0, wd, gb, gc = blocks[q, 0], blocks[q, 1], blocks[q, 2], blocks[q, 3]
            h = np.zeros((n, W), u.dtype)
            Ab = np.zeros((n, W), u.dtype)
            vec = np.zeros((4, W), u.dtype)
            y, dtv, dtu, zl = vec[0], vec[1], vec[2], vec[3]
            for k in range(n):
                for c in range(wd):
                    Ab[k, c] = At[k, c0 + c]
            for s in range(nseg):
                st = bi * nseg + s
                for k in range(n):
                    for c in range(wd):
                        h[k, c] = h0[st, c0 + c, k]
                start, end = segs[s, 0], segs[s, 1]
                for i in range(end - start):
                    t = end - 1 - i if reverse else start + i
                    if save and i % CHECKPOINT == 0:
                        ck = chk[bi, chunk0[s] + i // CHECKPOINT]
                        for k in range(n):
                            for c in range(wd):
                                ck[k, c0 + c] = h[k, c]
                    ut, dtt, Bt, Ct = u[bi, t], dt[bi, t], B[bi, t, gb], C[bi, t, gc]
                    for c in range(wd):
                        dtv[c] = dtt[c0 + c]
                        dtu[c] = dtt[c0 + c] * ut[c0 + c]
                    y[:] = zero
                    for k in range(n):
                        bk, ck_, hk, Ak = Bt[k], Ct[k], h[k], Ab[k]
                        for c in range(W):
                            v = (sa * fast_exp(dtv[c] * Ak[c]) + sb) * hk[c] + dtu[c] * bk
                            hk[c] = v
                            y[c] += ck_ * v
                    if has_D:
                        for c in range(wd):
                            y[c] += D[c0 + c] * ut[c0 + c]
                    if has_z:
                        if save:  # y before the gate, for the gate's gradient
                            yp = ypre[bi, t]
                            for c in range(wd):
                                yp[c0 + c] = y[c]
                        zt = z[bi, t]
                        for c in range(wd):
                            zl[c] = zt[c0 + c]
                        for c in range(lanes):  # all W lanes: vectorized exp (padding lanes: z 0)
                            y[c] *= zl[c] / (one + fast_exp(-zl[c]))
                    ot = out[bi, t]
                    for c in range(wd):
                        ot[c0 + c] = y[c]
                for k in range(n):
                    for c in range(wd):
                        last[st, c0 + c, k] = h[k, c]

    @njit(parallel=True, cache=True, fastmath=_FLAGS, error_model="numpy")
    def _backward(u, dt, z, ypre, At, D, B, C, segs, chunk0, blocks, chk, gout, glast,
                  gu, gdt, gz, gAt, gD, gB, gC, gh0, reverse, signed, has_D, has_z, one):
        batch, n = u.shape[0], At.shape[0]
        nseg, nblk = segs.shape[0], blocks.shape[0]
        nsplit = gB.shape[0]
        zero = one - one
        sa, sb = (one + one, -one) if signed else (one, zero)
        lanes = W if nblk > 0 else 0  # the gate's trip count, not foldable (see _forward)
        for w in prange(batch * nsplit):
            bi, j = w // nsplit, w % nsplit
            hs = np.zeros((CHECKPOINT + 1, n, W), u.dtype)  # states of one span, hs[0] its start
            As = np.zeros((CHECKPOINT, n, W), u.dtype)      # transitions of one span
            dts = np.zeros((CHECKPOINT, W), u.dtype)        # dt of one span
            carry = np.zeros((n, W), u.dtype)               # a_{t+1} dh_{t+1}, arriving at step t
            gAk = np.zeros((n, W), u.dtype)
            Ab = np.zeros((n, W), u.dtype)
            vec = np.zeros((8, W), u.dtype)
            g, dtu, gdtu, gdtv, gDv, zl, ypl, gzl = vec[0], vec[1], vec[2], vec[3], vec[4], vec[5], vec[6], vec[7]
            for q in range(j, nblk, nsplit):  # this split's blocks; it alone writes gB[j], gC[j]
                c0, wd, gb, gc = blocks[q, 0], blocks[q, 1], blocks[q, 2], blocks[q, 3]
                Ab[:] = zero
                hs[0] = zero
                carry[:] = zero
                dts[:] = zero
                dtu[:] = zero
                g[:] = zero
                zl[:] = zero
                ypl[:] = zero
                for k in range(n):
                    for c in range(wd):
                        Ab[k, c] = At[k, c0 + c]
                gAk[:] = zero
                gDv[:] = zero
                for s in range(nseg - 1, -1, -1):
                    st = bi * nseg + s
                    start, end = segs[s, 0], segs[s, 1]
                    L = end - start
                    for k in range(n):
                        for c in range(wd):
                            carry[k, c] = glast[st, c0 + c, k]
                    for sp in range((L + CHECKPOINT - 1) // CHECKPOINT - 1, -1, -1):
                        i0 = sp * CHECKPOINT
                        i1 = min(L, i0 + CHECKPOINT)
                        ck = chk[bi, chunk0[s] + sp]
                        for k in range(n):
                            for c in range(wd):
                                hs[0, k, c] = ck[k, c0 + c]
                        for i in range(i0, i1):  # rerun the span from its saved state
                            t = end - 1 - i if reverse else start + i
                            r = i - i0
                            ut, dtt, Bt, dtr = u[bi, t], dt[bi, t], B[bi, t, gb], dts[r]
                            for c in range(wd):
                                dtr[c] = dtt[c0 + c]
                                dtu[c] = dtt[c0 + c] * ut[c0 + c]
                            for k in range(n):
                                bk, Ak, ak, hp, hn = Bt[k], Ab[k], As[r, k], hs[r, k], hs[r + 1, k]
                                for c in range(W):
                                    a = sa * fast_exp(dtr[c] * Ak[c]) + sb
                                    ak[c] = a
                                    hn[c] = a * hp[c] + dtu[c] * bk
                        for i in range(i1 - 1, i0 - 1, -1):  # and walk it backwards
                            t = end - 1 - i if reverse else start + i
                            r = i - i0
                            ut, dtr, Bt, Ct, got = u[bi, t], dts[r], B[bi, t, gb], C[bi, t, gc], gout[bi, t]
                            for c in range(wd):
                                g[c] = got[c0 + c]
                                dtu[c] = dtr[c] * ut[c0 + c]
                            gdtu[:] = zero
                            gdtv[:] = zero
                            if has_z:
                                zt, gzt, yp = z[bi, t], gz[bi, t], ypre[bi, t]
                                for c in range(wd):
                                    zl[c] = zt[c0 + c]
                                    ypl[c] = yp[c0 + c]
                                gate_backward(g, zl, ypl, gzl, one, lanes)
                                for c in range(wd):
                                    gzt[c0 + c] = gzl[c]
                            for c in range(wd):
                                gDv[c] += g[c] * ut[c0 + c]
                            gBt, gCt = gB[j, bi, t, gb], gC[j, bi, t, gc]
                            for k in range(n):
                                bk, ck_, Ak, ak = Bt[k], Ct[k], Ab[k], As[r, k]
                                hp, hn, ca, gA_ = hs[r, k], hs[r + 1, k], carry[k], gAk[k]
                                sB = zero
                                sC = zero
                                for c in range(W):
                                    dh = ca[c] + ck_ * g[c]
                                    sC += hn[c] * g[c]
                                    sB += dh * dtu[c]
                                    gdtu[c] += dh * bk
                                    gdtA = dh * hp[c] * (ak[c] - sb)
                                    gdtv[c] += gdtA * Ak[c]
                                    gA_[c] += gdtA * dtr[c]
                                    ca[c] = ak[c] * dh
                                gBt[k] += sB
                                gCt[k] += sC
                            gut, gdtt = gu[bi, t], gdt[bi, t]
                            for c in range(wd):
                                gut[c0 + c] = gdtu[c] * dtr[c] + (g[c] * D[c0 + c] if has_D else zero)
                                gdtt[c0 + c] = gdtv[c] + gdtu[c] * ut[c0 + c]
                    for k in range(n):
                        for c in range(wd):
                            gh0[st, c0 + c, k] = carry[k, c]
                for k in range(n):
                    for c in range(wd):
                        gAt[bi, k, c0 + c] = gAk[k, c]
                for c in range(wd):
                    gD[bi, c0 + c] = gDv[c]


def _segments(length: int, cu_seqlens: Optional[torch.Tensor]):
    """(nseg, 2) start/end per sequence and the index of each sequence's first checkpoint."""
    bounds = [0, length] if cu_seqlens is None else [int(v) for v in cu_seqlens.tolist()]
    segs = np.array(list(zip(bounds[:-1], bounds[1:])), dtype=np.int64).reshape(-1, 2)
    spans = (segs[:, 1] - segs[:, 0] + CHECKPOINT - 1) // CHECKPOINT
    chunk0 = np.concatenate([[0], np.cumsum(spans)[:-1]]).astype(np.int64)
    return segs, chunk0, int(spans.sum())


def _blocks(dim: int, per_b: int, per_c: int) -> np.ndarray:
    """Channel blocks of at most W inside one group of B and one of C: rows (first channel, width, group of
    B, group of C), unsigned (see the kernels)."""
    out, c0 = [], 0
    while c0 < dim:
        c1 = min(c0 + W, dim, (c0 // per_b + 1) * per_b, (c0 // per_c + 1) * per_c)
        out.append((c0, c1 - c0, c0 // per_b, c0 // per_c))
        c0 = c1
    return np.array(out, dtype=np.uint64)


def _num_splits(batch: int, nblk: int) -> int:
    # Enough (batch, split) work items to keep every thread busy; each split keeps its own B and C
    # gradient partial of size (b, l, groups, n), summed afterwards.
    return max(1, min(nblk, -(-8 * numba.get_num_threads() // batch)))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def _as_groups(BC: torch.Tensor) -> torch.Tensor:
    return BC.unsqueeze(2) if BC.dim() == 3 else BC


class _FusedScan(torch.autograd.Function):
    """The recurrence, D and the z gate on contiguous (b, l, d) tensors in the accumulation dtype; dt arrives
    after delta_bias and softplus (elementwise, left to torch and its autograd). A arrives as (n, d)."""

    @staticmethod
    def forward(ctx, u, dt, At, B, C, D, z, h0, reverse, signed, cu_seqlens):
        batch, length, dim = u.shape
        n = At.shape[0]
        segs, chunk0, nchunks = _segments(length, cu_seqlens)
        blocks = _blocks(dim, dim // B.shape[2], dim // C.shape[2])
        save = any(ctx.needs_input_grad)
        out = torch.empty_like(u)
        last = At.new_empty(batch * segs.shape[0], dim, n)
        chk = At.new_empty(batch, nchunks if save else 0, n, dim)
        ypre = torch.empty_like(u) if save and z is not None else u[:, :0]
        z_ = z if z is not None else u[:, :0]
        # a copy: numpy() pins a tensor's storage, and FSDP frees and refills its unsharded parameters (D is one)
        D_ = D.detach().clone() if D is not None else At.new_zeros(dim)
        h0_ = h0 if h0 is not None else At.new_zeros(last.shape)
        _set_threads()
        _forward(_np(u), _np(dt), _np(z_), _np(At), _np(D_), _np(B), _np(C), _np(h0_), segs, chunk0, blocks,
                 _np(out), _np(last), _np(chk), _np(ypre), reverse, signed, D is not None, z is not None, save,
                 _np(u).dtype.type(1))
        if save:
            ctx.save_for_backward(u, dt, z_, ypre, At, D_, B, C, chk)
            ctx.cfg = (reverse, signed, segs, chunk0, blocks, D is not None, z is not None)
        return out, last

    @staticmethod
    @once_differentiable  # the numba backward records no graph: a second derivative raises instead of being wrong
    def backward(ctx, gout, glast):
        u, dt, z, ypre, At, D, B, C, chk = ctx.saved_tensors
        reverse, signed, segs, chunk0, blocks, has_D, has_z = ctx.cfg
        batch, _, dim = u.shape
        _set_threads()
        nsplit = _num_splits(batch, blocks.shape[0])
        gu, gdt, gz = torch.empty_like(u), torch.empty_like(u), torch.empty_like(z)
        gAt, gD = At.new_empty(batch, *At.shape), At.new_empty(batch, dim)
        gB, gC = B.new_zeros(nsplit, *B.shape), C.new_zeros(nsplit, *C.shape)
        gh0 = torch.empty_like(glast)
        _backward(_np(u), _np(dt), _np(z), _np(ypre), _np(At), _np(D), _np(B), _np(C), segs, chunk0, blocks, _np(chk),
                  _np(gout.contiguous()), _np(glast.contiguous()), _np(gu), _np(gdt), _np(gz), _np(gAt), _np(gD),
                  _np(gB), _np(gC), _np(gh0), reverse, signed, has_D, has_z, _np(u).dtype.type(1))
        return (gu, gdt, gAt.sum(0), gB.sum(0), gC.sum(0), gD.sum(0) if has_D else None,
                gz if has_z else None, gh0 if ctx.needs_input_grad[7] else None, None, None, None)


_pool_started = False


def _set_threads() -> None:
    """Follow torch.set_num_threads, within the pool numba started with. Starting numba's pool (its OpenMP
    layer shares libgomp with torch) resets the OpenMP thread count that torch reads to the pool's size: measured
    here, torch.set_num_threads(1) came back as 2 after the first fused scan, so torch's own ops, and every fused
    scan after it, ran on 2 threads. The count torch had is put back once the pool is up."""
    global _pool_started
    threads = torch.get_num_threads()
    if not _pool_started:
        numba.get_num_threads()  # starts the pool
        torch.set_num_threads(threads)
        _pool_started = True
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))


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
    dt = delta.to(acc)
    if delta_bias is not None:
        dt = dt + delta_bias.to(acc)
    if delta_softplus:
        dt = F.softplus(dt)
    cont = lambda t: None if t is None else t.to(acc).contiguous()  # noqa: E731
    out, last = _FusedScan.apply(
        cont(u), cont(dt), cont(A.t()), cont(_as_groups(B)), cont(_as_groups(C)), cont(D), cont(z),
        cont(initial_state), bool(reverse), bool(negative_eigenvalues), cu_seqlens,
    )
    out = out.to(u.dtype)
    return (out, last) if return_last_state else out
