"""Fused CPU SSD scan (numba): Mamba-2's scan with its (headdim x d_state) state per head kept in a small
per-block buffer, never anything of size (batch, length, heads, headdim, d_state).

The heads' channels are flattened to (batch, length, nheads * headdim), the layout x already has, and cut into
blocks of W channels inside one group of B and C (a block may hold several small heads, or part of a large one).
One compiled loop per (sequence, block) walks the time steps with the block's d_state x W state in L1 and reads
out y in the same step. The transition is one scalar per head and step (exp(dt A), or 2 exp(dt A) - 1 with
negative eigenvalues), computed once per channel lane and step, so the inner loop over d_state x W is two
multiply-adds in the forward. With gradients the forward keeps the state every ``CHECKPOINT`` steps; the
backward reruns each CHECKPOINT-step span from its saved state and walks it backwards. Memory beyond the inputs
and outputs: the checkpoints (b, l / CHECKPOINT, n, nheads * headdim), with z the output before the gate, and in
the backward per-channel dt gradients (b, l, nheads * headdim, summed over headdim) and B, C gradient partials
(splits, b, l, ngroups, n).

Shares the exp, block layout and thread setting of the Mamba-1 fused scan (``zoo.core.selective_scan.cpu_fused``);
like it, ``available()`` is False without numba and the op keeps the chunked PyTorch form.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from ..precision import compute_dtype
from ..selective_scan import cpu_fused as _m1
from ..selective_scan.cpu_fused import CHECKPOINT, W, _blocks, _np, _num_splits, _segments, _set_threads, available

__all__ = ["available", "ssd_scan_cpu"]

if _m1.numba is not None:
    from numba import njit, prange

    from ..selective_scan.cpu_fused import _FLAGS, fast_exp, gate_backward

    # The state of a block is W x d_state, each channel's row contiguous: the transition is one scalar per head
    # and step (computed once per step for the block's heads), so the inner loops run over d_state, four channels
    # at a time (four independent sums in flight, B and C read once for the four). d_state is a runtime trip
    # count: LLVM vectorizes those loops with runtime alias checks instead of unrolling them into scalar code.
    # Lanes past a block's width have transition 1, dt 0, x 0 and gradient 0, so their zero rows stay zero.
    # d_state indices are unsigned (numba's negative-index wraparound would turn vector loads into gathers).

    @njit(inline="always")
    def _quad_state(rows, n, dtype):
        # Four separate arrays, not four rows of one: LLVM's runtime alias checks between rows of one array at a
        # runtime distance failed here and sent the vectorized loops down their scalar fallback (measured 3x slower).
        return np.zeros((rows, n), dtype), np.zeros((rows, n), dtype), np.zeros((rows, n), dtype), np.zeros((rows, n), dtype)

    @njit(inline="always")
    def _block_heads(c0, wd, headdim, lh):
        """The block's first head and head count; lh[c]: lane c's head within the block (padding lanes: the
        count, a slot that keeps transition 1 and dt 0)."""
        hf = c0 // headdim
        nh = (c0 + wd - 1) // headdim - hf + 1
        for c in range(W):
            lh[c] = (c0 + c) // headdim - hf if c < wd else nh
        return hf, nh

    @njit(parallel=True, cache=True, fastmath=_FLAGS, error_model="numpy")
    def _forward(x, dt, z, Ah, D, B, C, h0, segs, chunk0, blocks, headdim, out, last, chk, ypre,
                 reverse, signed, has_D, has_z, save, one):
        # x, z, out, ypre (b, l, c) with c = nheads * headdim; dt (b, l, nheads); Ah (nheads,); D (c,);
        # B, C (b, l, g, n); h0, last (b or seqs, c, n); chk (b, spans, c, n).
        batch, n = x.shape[0], np.uint64(B.shape[3])
        nseg, nblk = segs.shape[0], blocks.shape[0]
        zero = one - one
        sa, sb = (one + one, -one) if signed else (one, zero)  # transition sa * exp(dt A) + sb
        for w in prange(batch * nblk):
            bi, q = w // nblk, w % nblk
            c0, wd, gb, gc = blocks[q, 0], blocks[q, 1], blocks[q, 2], blocks[q, 3]
            nq = (wd + np.uint64(3)) // np.uint64(4) * np.uint64(4)  # lanes in whole quads
            # the state: lane c is row c // 4 of array c % 4 (separate allocations: see _quad_state)
            h0q, h1q, h2q, h3q = _quad_state(W // 4, B.shape[3], x.dtype)
            hq = (h0q, h1q, h2q, h3q)
            lane = np.zeros((5, W + 1), x.dtype)
            ah, dth, xl, yl, zl = lane[0], lane[1], lane[2], lane[3], lane[4]  # per head: transition, dt; per lane: x, y, z
            ah[:] = one
            lh = np.zeros(W, np.uint64)
            hf, nh = _block_heads(c0, wd, headdim, lh)
            for s in range(nseg):
                st = bi * nseg + s
                for c in range(wd):
                    row = hq[c % 4][c // 4]
                    for k in range(n):
                        row[k] = h0[st, c0 + c, k]
                start, end = segs[s, 0], segs[s, 1]
                for i in range(end - start):
                    t = end - 1 - i if reverse else start + i
                    if save and i % CHECKPOINT == 0:
                        ck = chk[bi, chunk0[s] + i // CHECKPOINT]
                        for c in range(wd):
                            row = hq[c % 4][c // 4]
                            for k in range(n):
                                ck[c0 + c, k] = row[k]
                    xt, dtt, Bt, Ct, ot = x[bi, t], dt[bi, t], B[bi, t, gb], C[bi, t, gc], out[bi, t]
                    for m in range(nh):
                        dtv = dtt[hf + m]
                        dth[m] = dtv
                        ah[m] = sa * fast_exp(dtv * Ah[hf + m]) + sb
                    for c in range(wd):
                        xl[c] = xt[c0 + c]
                    for c in range(0, nq, 4):
                        a0, a1, a2, a3 = ah[lh[c]], ah[lh[c + 1]], ah[lh[c + 2]], ah[lh[c + 3]]
                        u0, u1 = dth[lh[c]] * xl[c], dth[lh[c + 1]] * xl[c + 1]
                        u2, u3 = dth[lh[c + 2]] * xl[c + 2], dth[lh[c + 3]] * xl[c + 3]
                        qi = c // 4
                        h0r, h1r, h2r, h3r = h0q[qi], h1q[qi], h2q[qi], h3q[qi]
                        y0 = y1 = y2 = y3 = zero
                        for k in range(n):
                            bk, ck_ = Bt[k], Ct[k]
                            v0 = a0 * h0r[k] + u0 * bk
                            v1 = a1 * h1r[k] + u1 * bk
                            v2 = a2 * h2r[k] + u2 * bk
                            v3 = a3 * h3r[k] + u3 * bk
                            h0r[k] = v0
                            h1r[k] = v1
                            h2r[k] = v2
                            h3r[k] = v3
                            y0 += ck_ * v0
                            y1 += ck_ * v1
                            y2 += ck_ * v2
                            y3 += ck_ * v3
                        yl[c], yl[c + 1], yl[c + 2], yl[c + 3] = y0, y1, y2, y3
                    if has_D:
                        for c in range(wd):
                            yl[c] += D[c0 + c] * xl[c]
                    if has_z:
                        zt = z[bi, t]
                        for c in range(wd):
                            zl[c] = zt[c0 + c]
                            if save:  # y before the gate, for the gate's gradient
                                ypre[bi, t, c0 + c] = yl[c]
                        for c in range(W):  # all lanes: vectorized exp (padding lanes: z 0)
                            yl[c] *= zl[c] / (one + fast_exp(-zl[c]))
                    for c in range(wd):
                        ot[c0 + c] = yl[c]
                for c in range(wd):
                    row = hq[c % 4][c // 4]
                    for k in range(n):
                        last[st, c0 + c, k] = row[k]

    @njit(parallel=True, cache=True, fastmath=_FLAGS, error_model="numpy")
    def _backward(x, dt, z, ypre, Ah, D, B, C, segs, chunk0, blocks, headdim, chk, gout, glast,
                  gx, gdtc, gz, gAl, gD, gB, gC, gh0, reverse, signed, has_D, has_z, one):
        # gdtc (b, l, c): dt's gradient per channel (the caller sums each head's); gAl, gD (b, c): A's and D's per
        # channel; gB, gC (splits, b, l, g, n): split j alone writes gB[j], gC[j].
        batch, n = x.shape[0], np.uint64(B.shape[3])
        nseg, nblk = segs.shape[0], blocks.shape[0]
        nsplit = gB.shape[0]
        zero = one - one
        sa, sb = (one + one, -one) if signed else (one, zero)
        for w in prange(batch * nsplit):
            bi, j = w // nsplit, w % nsplit
            # lane c is row c // 4 of array c % 4 in each of: the states of one span (hs[0] its start), the running
            # state of the rerun, and the carry a_{t+1} dS_{t+1} arriving at step t
            hs0, hs1, hs2, hs3 = _quad_state((CHECKPOINT + 1) * (W // 4), B.shape[3], x.dtype)
            hsq = (hs0.reshape(CHECKPOINT + 1, W // 4, B.shape[3]), hs1.reshape(CHECKPOINT + 1, W // 4, B.shape[3]),
                   hs2.reshape(CHECKPOINT + 1, W // 4, B.shape[3]), hs3.reshape(CHECKPOINT + 1, W // 4, B.shape[3]))
            curq = _quad_state(W // 4, B.shape[3], x.dtype)
            e0q, e1q, e2q, e3q = _quad_state(W // 4, B.shape[3], x.dtype)
            carq = (e0q, e1q, e2q, e3q)
            span = np.zeros((2, CHECKPOINT, W + 1), x.dtype)          # per head: transitions and dt of one span
            As, dts = span[0], span[1]
            gBs = np.zeros(B.shape[3], x.dtype)                       # this step's B and C gradients
            gCs = np.zeros(B.shape[3], x.dtype)
            lane = np.zeros((9, W), x.dtype)
            xl, gl, gdul, gdal, gDv, gAv = lane[0], lane[1], lane[2], lane[3], lane[4], lane[5]
            zl, ypl, gzl = lane[6], lane[7], lane[8]
            lh = np.zeros(W, np.uint64)
            for q in range(j, nblk, nsplit):  # this split's blocks
                c0, wd, gb, gc = blocks[q, 0], blocks[q, 1], blocks[q, 2], blocks[q, 3]
                nq = (wd + np.uint64(3)) // np.uint64(4) * np.uint64(4)
                hf, nh = _block_heads(c0, wd, headdim, lh)
                As[:, nh] = one
                dts[:, nh] = zero
                lane[:] = zero
                for jq in range(4):  # padding lanes: zero rows
                    hsq[jq][0] = zero
                    curq[jq][:] = zero
                    carq[jq][:] = zero
                for s in range(nseg - 1, -1, -1):
                    st = bi * nseg + s
                    start, end = segs[s, 0], segs[s, 1]
                    L = end - start
                    for c in range(wd):
                        row = carq[c % 4][c // 4]
                        for k in range(n):
                            row[k] = glast[st, c0 + c, k]
                    for sp in range((L + CHECKPOINT - 1) // CHECKPOINT - 1, -1, -1):
                        i0 = sp * CHECKPOINT
                        i1 = min(L, i0 + CHECKPOINT)
                        ck = chk[bi, chunk0[s] + sp]
                        for c in range(wd):
                            row, cur = hsq[c % 4][0, c // 4], curq[c % 4][c // 4]
                            for k in range(n):
                                row[k] = ck[c0 + c, k]
                                cur[k] = ck[c0 + c, k]
                        for i in range(i0, i1):  # rerun the span from its saved state
                            t = end - 1 - i if reverse else start + i
                            r = i - i0
                            xt, dtt, Bt = x[bi, t], dt[bi, t], B[bi, t, gb]
                            for m in range(nh):
                                dtv = dtt[hf + m]
                                dts[r, m] = dtv
                                As[r, m] = sa * fast_exp(dtv * Ah[hf + m]) + sb
                            for c in range(wd):
                                xl[c] = xt[c0 + c]
                            for c in range(0, nq, 4):  # four lanes in place, as in the forward
                                qi = c // 4
                                a0, a1, a2, a3 = As[r, lh[c]], As[r, lh[c + 1]], As[r, lh[c + 2]], As[r, lh[c + 3]]
                                u0, u1 = dts[r, lh[c]] * xl[c], dts[r, lh[c + 1]] * xl[c + 1]
                                u2, u3 = dts[r, lh[c + 2]] * xl[c + 2], dts[r, lh[c + 3]] * xl[c + 3]
                                s0, s1, s2, s3 = curq[0][qi], curq[1][qi], curq[2][qi], curq[3][qi]
                                for k in range(n):
                                    bk = Bt[k]
                                    s0[k] = a0 * s0[k] + u0 * bk
                                    s1[k] = a1 * s1[k] + u1 * bk
                                    s2[k] = a2 * s2[k] + u2 * bk
                                    s3[k] = a3 * s3[k] + u3 * bk
                                for jq in range(4):  # kept for the walk
                                    src, dst = curq[jq][qi], hsq[jq][r + 1, qi]
                                    for k in range(n):
                                        dst[k] = src[k]
                        for i in range(i1 - 1, i0 - 1, -1):  # and walk it backwards
                            t = end - 1 - i if reverse else start + i
                            r = i - i0
                            xt, Bt, Ct, got = x[bi, t], B[bi, t, gb], C[bi, t, gc], gout[bi, t]
                            for c in range(wd):
                                gl[c] = got[c0 + c]
                                xl[c] = xt[c0 + c]
                            if has_z:
                                zt, yp, gzt = z[bi, t], ypre[bi, t], gz[bi, t]
                                for c in range(wd):
                                    zl[c] = zt[c0 + c]
                                    ypl[c] = yp[c0 + c]
                                gate_backward(gl, zl, ypl, gzl, one, W)
                                for c in range(wd):
                                    gzt[c0 + c] = gzl[c]
                            for c in range(W):
                                gDv[c] += gl[c] * xl[c]
                            gBs[:] = zero
                            gCs[:] = zero
                            for c in range(0, nq, 4):
                                a0, a1, a2, a3 = As[r, lh[c]], As[r, lh[c + 1]], As[r, lh[c + 2]], As[r, lh[c + 3]]
                                u0, u1 = dts[r, lh[c]] * xl[c], dts[r, lh[c + 1]] * xl[c + 1]
                                u2, u3 = dts[r, lh[c + 2]] * xl[c + 2], dts[r, lh[c + 3]] * xl[c + 3]
                                g0, g1, g2, g3 = gl[c], gl[c + 1], gl[c + 2], gl[c + 3]
                                qi = c // 4
                                p0, p1, p2, p3 = hsq[0][r, qi], hsq[1][r, qi], hsq[2][r, qi], hsq[3][r, qi]
                                n0, n1, n2, n3 = hsq[0][r + 1, qi], hsq[1][r + 1, qi], hsq[2][r + 1, qi], hsq[3][r + 1, qi]
                                e0, e1, e2, e3 = e0q[qi], e1q[qi], e2q[qi], e3q[qi]
                                du0 = du1 = du2 = du3 = zero
                                da0 = da1 = da2 = da3 = zero
                                for k in range(n):
                                    bk, ck_ = Bt[k], Ct[k]
                                    d0 = e0[k] + ck_ * g0
                                    d1 = e1[k] + ck_ * g1
                                    d2 = e2[k] + ck_ * g2
                                    d3 = e3[k] + ck_ * g3
                                    gCs[k] += n0[k] * g0 + n1[k] * g1 + n2[k] * g2 + n3[k] * g3
                                    gBs[k] += d0 * u0 + d1 * u1 + d2 * u2 + d3 * u3
                                    du0 += d0 * bk
                                    du1 += d1 * bk
                                    du2 += d2 * bk
                                    du3 += d3 * bk
                                    da0 += d0 * p0[k]
                                    da1 += d1 * p1[k]
                                    da2 += d2 * p2[k]
                                    da3 += d3 * p3[k]
                                    e0[k] = a0 * d0
                                    e1[k] = a1 * d1
                                    e2[k] = a2 * d2
                                    e3[k] = a3 * d3
                                gdul[c], gdul[c + 1], gdul[c + 2], gdul[c + 3] = du0, du1, du2, du3
                                gdal[c], gdal[c + 1], gdal[c + 2], gdal[c + 3] = da0, da1, da2, da3
                            gxt, gdt_t = gx[bi, t], gdtc[bi, t]
                            for c in range(wd):
                                cc = c0 + c
                                a, dtv = As[r, lh[c]], dts[r, lh[c]]
                                gdtA = gdal[c] * (a - sb)  # gradient of dt * A
                                gAv[c] += gdtA * dtv
                                gxt[cc] = gdul[c] * dtv + (gl[c] * D[cc] if has_D else zero)
                                gdt_t[cc] = gdtA * Ah[hf + lh[c]] + gdul[c] * xl[c]
                            gBt, gCt = gB[j, bi, t, gb], gC[j, bi, t, gc]
                            for k in range(n):
                                gBt[k] += gBs[k]
                                gCt[k] += gCs[k]
                    for c in range(wd):
                        row = carq[c % 4][c // 4]
                        for k in range(n):
                            gh0[st, c0 + c, k] = row[k]
                for c in range(wd):
                    gAl[bi, c0 + c] = gAv[c]
                    gD[bi, c0 + c] = gDv[c]


class _FusedSSD(torch.autograd.Function):
    """The recurrence, D and the z gate on contiguous tensors in the accumulation dtype: x, z (b, l, c) with
    c = nheads * headdim; dt (b, l, nheads) after bias, softplus and limits (left to torch and its autograd);
    A (nheads,); D per channel (c,) (its expansion from per head is torch's); h0 (b or seqs, c, n)."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, h0, headdim, reverse, signed, cu_seqlens):
        batch, length, chans = x.shape
        n = B.shape[3]
        per_group = chans // B.shape[2]
        segs, chunk0, nchunks = _segments(length, cu_seqlens)
        blocks = _blocks(chans, per_group, per_group)
        save = any(ctx.needs_input_grad)
        out = torch.empty_like(x)
        last = x.new_empty(batch * segs.shape[0], chans, n)
        chk = x.new_empty(batch, nchunks if save else 0, chans, n)
        ypre = torch.empty_like(x) if save and z is not None else x[:, :0]
        z_ = z if z is not None else x[:, :0]
        # copies: numpy() pins a tensor's storage, and FSDP frees and refills its unsharded parameters
        D_ = D.detach().clone() if D is not None else x.new_zeros(chans)
        A_ = A.detach().clone()
        h0_ = h0 if h0 is not None else x.new_zeros(last.shape)
        one = _np(x).dtype.type(1)
        _set_threads()
        _forward(_np(x), _np(dt), _np(z_), _np(A_), _np(D_), _np(B), _np(C), _np(h0_), segs, chunk0, blocks,
                 headdim, _np(out), _np(last), _np(chk), _np(ypre), reverse, signed, D is not None, z is not None,
                 save, one)
        if save:
            ctx.save_for_backward(x, dt, z_, ypre, A_, D_, B, C, chk)
            ctx.cfg = (headdim, reverse, signed, segs, chunk0, blocks, D is not None, z is not None)
        return out, last

    @staticmethod
    @once_differentiable  # the numba backward records no graph: a second derivative raises instead of being wrong
    def backward(ctx, gout, glast):
        x, dt, z, ypre, A, D, B, C, chk = ctx.saved_tensors
        headdim, reverse, signed, segs, chunk0, blocks, has_D, has_z = ctx.cfg
        batch, length, chans = x.shape
        _set_threads()
        nsplit = _num_splits(batch, blocks.shape[0])
        gx, gdtc, gz = torch.empty_like(x), torch.empty_like(x), torch.empty_like(z)
        gAl, gD = x.new_empty(batch, chans), x.new_empty(batch, chans)
        gB, gC = B.new_zeros(nsplit, *B.shape), C.new_zeros(nsplit, *C.shape)
        gh0 = torch.empty_like(glast)
        _backward(_np(x), _np(dt), _np(z), _np(ypre), _np(A), _np(D), _np(B), _np(C), segs, chunk0, blocks,
                  headdim, _np(chk), _np(gout.contiguous()), _np(glast.contiguous()), _np(gx), _np(gdtc), _np(gz), _np(gAl),
                  _np(gD), _np(gB), _np(gC), _np(gh0), reverse, signed, has_D, has_z, _np(x).dtype.type(1))
        gdt = gdtc.view(batch, length, chans // headdim, headdim).sum(-1)
        return (gx, gdt, gAl.sum(0).view(-1, headdim).sum(-1), gB.sum(0), gC.sum(0), gD.sum(0) if has_D else None, gz if has_z else None,
                gh0 if ctx.needs_input_grad[7] else None, None, None, None, None)


def ssd_scan_cpu(
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
    cu_seqlens: Optional[torch.Tensor] = None,
):
    """Same contract as :func:`zoo.core.ssd.naive.ssd_scan_naive` (``dt`` the final step size, inputs validated
    by ``ssd_scan``), packed sequences handled natively: the state restarts at every ``cu_seqlens`` boundary.
    Returns (out in x's dtype, final state (b or seqs, nheads, headdim, d_state) in the accumulation dtype)."""
    if _m1.numba is None:
        raise RuntimeError("ssd_scan: the fused CPU scan needs numba; pip install 'mamba-zoo[cpu]'")
    acc = compute_dtype(x.dtype)
    batch, length, nheads, headdim = x.shape
    chans = nheads * headdim
    cont = lambda t: None if t is None else t.to(acc).contiguous()  # noqa: E731
    per_channel = lambda t: t.to(acc)[:, None].expand(nheads, headdim).reshape(chans)  # noqa: E731
    D1 = None if D is None else (per_channel(D) if D.dim() == 1 else D.to(acc).reshape(chans))
    h0 = None if initial_state is None else initial_state.to(acc).reshape(-1, chans, B.shape[-1]).contiguous()
    out, last = _FusedSSD.apply(
        cont(x.reshape(batch, length, chans)), cont(dt), cont(A), cont(B), cont(C), cont(D1),
        None if z is None else cont(z.reshape(batch, length, chans)), h0, headdim, bool(reverse),
        bool(negative_eigenvalues), cu_seqlens,
    )
    return out.to(x.dtype).reshape(batch, length, nheads, headdim), last.reshape(-1, nheads, headdim, B.shape[-1])
