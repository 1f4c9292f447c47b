"""Triton kernels of the SSD (Mamba-2) scan: one forward kernel and two backward kernels per backward segment.

Notation (see zoo/core/ssd/chunked.py for the same algebra in PyTorch): time is cut into chunks of Q
steps; within a chunk cs_i is the cumulative sum of log-transitions (dt_i * A, or log|2 exp(dt_i A) - 1| with
negative eigenvalues, whose signs are carried as a running count of negative factors), u_j = dt_j x_j,
H_c the (headdim, d_state) state entering chunk c.

- ``_fwd_kernel``: a program owns one (batch, head, headdim block) and walks the chunks in order with the
  state in registers, so the states never go to memory (in training it writes those at segment starts).
  Per chunk: y = (C B^T o decay) u + decay_in * C H_c, then H_{c+1} = decay_all H_c + (decay_out u)^T B.
- ``_bwd_walks_kernel``: for one segment of chunks, the same walk from the stored segment start writing the
  state entering every chunk, and beside it the walk backwards over dout: dH_c, the gradient of the state
  leaving chunk c.
- ``_bwd_chunk_kernel``: every chunk at once; a program owns (chunk, batch, group, a split of the group's
  heads) and loops over those heads, so the heads' dB and dC contributions sum in registers (no atomics).
  The gradient of the cumulative log-transitions needs no extra pass: d cs_k = dy_k . y_k - u_k . du_k, plus
  dH . H at the chunk's last step, and d(dt A)_t is its reverse cumulative sum.
"""
from __future__ import annotations

import triton
import triton.language as tl

_TINY = tl.constexpr(1.1754943508222875e-38)  # float32's smallest normal: |transition| floor that keeps the logarithm finite


@triton.jit
def _mm(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _log_transitions(dt, A_h, SIGNED: tl.constexpr):
    """Per step: the log-magnitude of the transition, and 1 where it is negative (SIGNED) else 0."""
    dA = dt * A_h
    if SIGNED:
        a = 2.0 * tl.exp(dA) - 1.0
        return tl.log(tl.maximum(tl.abs(a), _TINY)), (a < 0).to(tl.int32)
    else:
        return dA, tl.zeros_like(dA).to(tl.int32)


@triton.jit
def _signed(log_mag, parity, SIGNED: tl.constexpr):
    """exp(log_mag), negated where parity is odd."""
    v = tl.exp(log_mag)
    if SIGNED:
        v = tl.where((parity & 1) == 1, -v, v)
    return v


@triton.jit
def _chunk_rows(c, L, Q: tl.constexpr, REVERSE: tl.constexpr):
    """Positions in the sequence of the chunk's Q logical steps, and which of them exist."""
    tau = c * Q + tl.arange(0, Q)
    valid = tau < L
    if REVERSE:
        pos = L - 1 - tau
    else:
        pos = tau
    return tl.where(valid, pos, 0), valid


@triton.jit
def _decays(dt, A_h, Q: tl.constexpr, SIGNED: tl.constexpr):
    """(decay matrix L[i, j] = prod_{j < t <= i} a_t (0 above the diagonal), decay_in[i] = prod_{t <= i} a_t,
    decay_out[j] = prod_{j < t < Q} a_t, decay_all = prod_t a_t, cs, lm)."""
    lm, neg = _log_transitions(dt, A_h, SIGNED)
    cs = tl.cumsum(lm, 0)
    odd = tl.cumsum(neg, 0)
    total = tl.sum(lm, 0)
    odd_total = tl.sum(neg, 0)
    i = tl.arange(0, Q)
    causal = i[:, None] >= i[None, :]
    seg = tl.where(causal, cs[:, None] - cs[None, :], float("-inf"))
    Lmat = _signed(seg, odd[:, None] - odd[None, :], SIGNED)
    d_in = _signed(cs, odd, SIGNED)
    d_out = _signed(total - cs, odd_total - odd, SIGNED)
    d_all = _signed(total, odd_total, SIGNED)
    return Lmat, d_in, d_out, d_all, lm


@triton.jit
def _walk_program(pid, b, A_ptr, H, P, N, HPG, BP: tl.constexpr, BN: tl.constexpr):
    """A walk program's head h, headdim block p, states n, their masks, group, A[h], and the (b, h, p, n)
    offsets of its part of a state."""
    npb = tl.cdiv(P, BP)
    h = pid // npb
    p = (pid % npb) * BP + tl.arange(0, BP)
    n = tl.arange(0, BN)
    sp = (b * H + h) * P * N + p[:, None] * N + n[None, :]
    return h, p, n, p < P, n < N, h // HPG, tl.load(A_ptr + h).to(tl.float32), sp


@triton.jit
def _fwd_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, init_ptr, out_ptr, ungated_ptr, final_ptr, states_ptr,
    L, H, P, N, G, HPG, C0, NCS, STEP, NSTORED, init_sb,
    Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
    HAS_D: tl.constexpr, D_PER_CHANNEL: tl.constexpr, HAS_Z: tl.constexpr, HAS_INIT: tl.constexpr,
    STORE_STATES: tl.constexpr, STORE_UNGATED: tl.constexpr, REVERSE: tl.constexpr, SIGNED: tl.constexpr,
    IEEE: tl.constexpr,
):
    _state_walk(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, init_ptr, out_ptr, ungated_ptr, final_ptr, states_ptr,
                L, H, P, N, G, HPG, C0, NCS, STEP, NSTORED, init_sb, tl.program_id(0), tl.program_id(1).to(tl.int64),
                Q, BP, BN, HAS_D, D_PER_CHANNEL, HAS_Z, HAS_INIT, True, STORE_STATES, STORE_UNGATED, REVERSE, SIGNED,
                IEEE)


@triton.jit
def _state_walk(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, init_ptr, out_ptr, ungated_ptr, final_ptr, states_ptr,
    L, H, P, N, G, HPG, C0, NCS, STEP, NSTORED, init_sb, pid, b,
    Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
    HAS_D: tl.constexpr, D_PER_CHANNEL: tl.constexpr, HAS_Z: tl.constexpr, HAS_INIT: tl.constexpr,
    STORE_OUT: tl.constexpr, STORE_STATES: tl.constexpr, STORE_UNGATED: tl.constexpr, REVERSE: tl.constexpr,
    SIGNED: tl.constexpr, IEEE: tl.constexpr,
):
    """Program (pid = head x headdim block, b) walks chunks C0 .. C0 + NCS - 1 from the state init (batch
    stride init_sb). With STORE_STATES the state entering every STEP-th chunk of the walk goes to states[b, k]
    (NSTORED slots), and the state leaving the walk to the slot after the last one. STORE_OUT writes the output,
    STORE_UNGATED (with z) also the output before the gate, for the backward's dz."""
    h, p, n, pm, nm, g, A_h, sp = _walk_program(pid, b, A_ptr, H, P, N, HPG, BP, BN)
    dtype = x_ptr.dtype.element_ty
    hp = h * P * N + p[:, None] * N + n[None, :]
    if HAS_INIT:
        state = tl.load(init_ptr + b * init_sb + hp, mask=pm[:, None] & nm[None, :], other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BP, BN), dtype=tl.float32)
    if HAS_D:
        if D_PER_CHANNEL:
            Dv = tl.load(D_ptr + h * P + p, mask=pm, other=0.0).to(tl.float32)
        else:
            Dv = tl.load(D_ptr + h).to(tl.float32)
    for k in range(NCS):
        c = C0 + k
        pos, valid = _chunk_rows(c, L, Q, REVERSE)
        row = b * L + pos
        dt = tl.load(dt_ptr + row * H + h, mask=valid, other=0.0)
        Lmat, d_in, d_out, d_all, _ = _decays(dt, A_h, Q, SIGNED)
        xm = valid[:, None] & pm[None, :]
        bm = valid[:, None] & nm[None, :]
        xo = (row[:, None] * H + h) * P + p[None, :]
        x = tl.load(x_ptr + xo, mask=xm, other=0.0)
        bo = (row[:, None] * G + g) * N + n[None, :]
        Bc = tl.load(B_ptr + bo, mask=bm, other=0.0)
        Cc = tl.load(C_ptr + bo, mask=bm, other=0.0)
        if STORE_STATES:
            if k % STEP == 0:
                tl.store(states_ptr + ((b * NSTORED + k // STEP) * H) * P * N + hp, state.to(states_ptr.dtype.element_ty),
                         mask=pm[:, None] & nm[None, :])
        if STORE_OUT:
            CB = _mm(Cc, tl.trans(Bc), IEEE)
            W = (CB * Lmat * dt[None, :]).to(dtype)
            y = _mm(W, x, IEEE)
            y += d_in[:, None] * _mm(Cc, tl.trans(state.to(dtype)), IEEE)
            if HAS_D:
                if D_PER_CHANNEL:
                    y += Dv[None, :] * x.to(tl.float32)
                else:
                    y += Dv * x.to(tl.float32)
            if HAS_Z:
                if STORE_UNGATED:
                    tl.store(ungated_ptr + xo, y.to(ungated_ptr.dtype.element_ty), mask=xm)
                zv = tl.load(z_ptr + xo, mask=xm, other=0.0).to(tl.float32)
                y = y * zv * tl.sigmoid(zv)
            tl.store(out_ptr + xo, y.to(out_ptr.dtype.element_ty), mask=xm)
        u = (x.to(tl.float32) * (dt * d_out)[:, None]).to(dtype)
        state = d_all * state + _mm(tl.trans(u), Bc, IEEE)
    tl.store(final_ptr + sp, state, mask=pm[:, None] & nm[None, :])
    if STORE_STATES:
        tl.store(states_ptr + ((b * NSTORED + NSTORED - 1) * H) * P * N + hp, state.to(states_ptr.dtype.element_ty),
                 mask=pm[:, None] & nm[None, :])


@triton.jit
def _gated_dout(dout_ptr, z_ptr, xo, xm, HAS_Z: tl.constexpr):
    """dout times silu(z): the gradient of the ungated output."""
    dy = tl.load(dout_ptr + xo, mask=xm, other=0.0).to(tl.float32)
    if HAS_Z:
        zv = tl.load(z_ptr + xo, mask=xm, other=0.0).to(tl.float32)
        dy = dy * zv * tl.sigmoid(zv)
    return dy


@triton.jit
def _bwd_walks_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, starts_ptr, scratch_ptr, states_ptr, starts_sb,
    dout_ptr, z_ptr, dcarry_ptr, dstates_ptr,
    L, H, P, N, G, HPG, C0, NCS,
    Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
    HAS_Z: tl.constexpr, REVERSE: tl.constexpr, SIGNED: tl.constexpr, IEEE: tl.constexpr,
):
    """The two walks of a backward segment, independent of each other, in one launch (program_id(2) picks):
    its chunk states from the stored segment start, and the gradients of the states leaving its chunks."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    if tl.program_id(2) == 0:
        _state_walk(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, starts_ptr, x_ptr, x_ptr, scratch_ptr,
                    states_ptr, L, H, P, N, G, HPG, C0, NCS, 1, NCS + 1, starts_sb, pid, b,
                    Q, BP, BN, False, False, False, True, False, True, False, REVERSE, SIGNED, IEEE)
    else:
        _dstate_walk(dout_ptr, dt_ptr, A_ptr, C_ptr, z_ptr, dcarry_ptr, dstates_ptr, L, H, P, N, G, HPG, C0, NCS,
                     pid, b, Q, BP, BN, HAS_Z, REVERSE, SIGNED, IEEE)


@triton.jit
def _dstate_walk(
    dout_ptr, dt_ptr, A_ptr, C_ptr, z_ptr, dcarry_ptr, dstates_ptr,
    L, H, P, N, G, HPG, C0, NCS, pid, b,
    Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
    HAS_Z: tl.constexpr, REVERSE: tl.constexpr, SIGNED: tl.constexpr, IEEE: tl.constexpr,
):
    """Walks chunks C0 + NCS - 1 down to C0: dstates[b, k] = gradient of the state leaving chunk C0 + k.
    dcarry holds the gradient of the state leaving the walk and receives that of the state entering it."""
    h, p, n, pm, nm, g, A_h, sp = _walk_program(pid, b, A_ptr, H, P, N, HPG, BP, BN)
    dtype = C_ptr.dtype.element_ty
    dstate = tl.load(dcarry_ptr + sp, mask=pm[:, None] & nm[None, :], other=0.0)
    for i in range(NCS):
        k = NCS - 1 - i
        c = C0 + k
        tl.store(dstates_ptr + ((b * NCS + k) * H + h) * P * N + p[:, None] * N + n[None, :],
                 dstate.to(dstates_ptr.dtype.element_ty), mask=pm[:, None] & nm[None, :])
        pos, valid = _chunk_rows(c, L, Q, REVERSE)
        row = b * L + pos
        dt = tl.load(dt_ptr + row * H + h, mask=valid, other=0.0)
        lm, neg = _log_transitions(dt, A_h, SIGNED)
        d_in = _signed(tl.cumsum(lm, 0), tl.cumsum(neg, 0), SIGNED)
        d_all = _signed(tl.sum(lm, 0), tl.sum(neg, 0), SIGNED)
        xm = valid[:, None] & pm[None, :]
        xo = (row[:, None] * H + h) * P + p[None, :]
        dy = _gated_dout(dout_ptr, z_ptr, xo, xm, HAS_Z)
        Cc = tl.load(C_ptr + (row[:, None] * G + g) * N + n[None, :], mask=valid[:, None] & nm[None, :], other=0.0)
        dstate = d_all * dstate + _mm(tl.trans((dy * d_in[:, None]).to(dtype)), Cc, IEEE)
    tl.store(dcarry_ptr + sp, dstate, mask=pm[:, None] & nm[None, :])


@triton.jit
def _chunk_head_block(
    x_ptr, D_ptr, z_ptr, ungated_ptr, dout_ptr, states_ptr, dstates_ptr, dx_ptr, dD_ptr, dz_ptr,
    h, b, k, c, p0, row, valid, n, nm, Bc, Cc, CB, W, Lmat, dt, d_in, d_out, d_all, last,
    dB_acc, dC_acc, Mt_acc, dcs, ddt_u, H, P, N, NC, NCS,
    BP: tl.constexpr, HAS_D: tl.constexpr, D_PER_CHANNEL: tl.constexpr, STORE_DD: tl.constexpr,
    HAS_Z: tl.constexpr, LOAD_UNGATED: tl.constexpr, IEEE: tl.constexpr,
):
    """One head's, one headdim block's part of a chunk's gradients: stores dx (and dD's part, and dz from the
    ungated output: stored by the forward with LOAD_UNGATED, else recomputed from the chunk's inputs and the state
    entering it), returns the accumulators of dB's and dC's state parts and of Mt (summed over heads), d cs and
    dt . du (summed over the headdim)."""
    dtype = x_ptr.dtype.element_ty
    p = p0 + tl.arange(0, BP)
    pm = p < P
    xm = valid[:, None] & pm[None, :]
    xo = (row[:, None] * H + h) * P + p[None, :]
    x = tl.load(x_ptr + xo, mask=xm, other=0.0)
    xf = x.to(tl.float32)
    do = tl.load(dout_ptr + xo, mask=xm, other=0.0).to(tl.float32)
    sm = pm[:, None] & nm[None, :]
    so = p[:, None] * N + n[None, :]
    H_in = tl.load(states_ptr + ((b * (NCS + 1) + k) * H + h) * P * N + so, mask=sm, other=0.0)
    if HAS_D:
        if D_PER_CHANNEL:
            Dv = tl.load(D_ptr + h * P + p, mask=pm, other=0.0).to(tl.float32)[None, :]
        else:
            Dv = tl.load(D_ptr + h).to(tl.float32)
    if HAS_Z:  # y silu(z) was the output: dz = dout y silu'(z), dy = dout silu(z)
        zv = tl.load(z_ptr + xo, mask=xm, other=0.0).to(tl.float32)
        sz = tl.sigmoid(zv)
        if LOAD_UNGATED:
            y = tl.load(ungated_ptr + xo, mask=xm, other=0.0).to(tl.float32)
        else:
            y = _mm((W * dt[None, :]).to(dtype), x, IEEE) + d_in[:, None] * _mm(Cc, tl.trans(H_in.to(dtype)), IEEE)
            if HAS_D:
                y += Dv * xf
        tl.store(dz_ptr + xo, (do * y * sz * (1.0 + zv * (1.0 - sz))).to(dz_ptr.dtype.element_ty), mask=xm)
        dy = do * zv * sz
    else:
        dy = do
    dyc = dy.to(dtype)
    dH = tl.load(dstates_ptr + ((b * NCS + k) * H + h) * P * N + so, mask=sm, other=0.0)
    # du_j = sum_{i >= j} W_ij dy_i + decay_out_j dH B_j
    BdH = _mm(Bc, tl.trans(dH.to(dtype)), IEEE)
    du = _mm(tl.trans(W.to(dtype)), dyc, IEEE) + d_out[:, None] * BdH
    dx = dt[:, None] * du
    if HAS_D:
        dx += Dv * dy
        if STORE_DD:  # else summed by _channel_dot_kernel: this reduction over the chunk's steps costs more here
            tl.store(dD_ptr + ((b * NC + c) * H + h) * P + p, tl.sum(dy * xf, 0), mask=pm)
    tl.store(dx_ptr + xo, dx.to(dx_ptr.dtype.element_ty), mask=xm)
    ddt_u += tl.sum(xf * du, 1)
    # (i, j): dy_i . x_j times the decay from j to i and dt_j. The intra-chunk parts of dB and dC are
    # Mt^T C and Mt B with B and C shared by the group's heads: Mt is summed over the heads and multiplied once.
    Mt = Lmat * _mm(dyc, tl.trans(x), IEEE) * dt[None, :]
    Mt_acc += Mt
    dB_acc += (dt * d_out)[:, None] * _mm(x, dH.to(dtype), IEEE)
    dyH = _mm(dyc, H_in.to(dtype), IEEE)  # (i, n): dy_i H_in
    dC_acc += d_in[:, None] * dyH
    # d cs_k = dy_k . y_k - u_k . du_k (+ dH . H_out at the last step), each part summed in float32 from
    # the products it is made of (C_k . dC_k summed over d_state loses the digits that cancel); the state
    # part of dy_i . y_i, d_in_i dy_i . (H_in C_i), is d_in_i C_i . (dy_i H_in). The state leaving the chunk
    # is not loaded: H_out = decay_all H_in + sum_j u_j B_j, so dH . H_out = decay_all dH . H_in + sum_j u_j . (dH B_j).
    R = Mt * CB
    uBdH = dt * d_out * tl.sum(xf * BdH, 1)
    dcs += tl.sum(R, 1) - tl.sum(R, 0) + d_in * tl.sum(Cc.to(tl.float32) * dyH, 1) - uBdH
    dHH = d_all * tl.sum(tl.sum(dH.to(tl.float32) * H_in.to(tl.float32), 1), 0) + tl.sum(uBdH, 0)
    dcs += tl.where(last, dHH, 0.0)
    return dB_acc, dC_acc, Mt_acc, dcs, ddt_u


@triton.jit
def _bwd_chunk_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, ungated_ptr, dout_ptr, states_ptr, dstates_ptr,
    dx_ptr, ddt_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dz_ptr,  # dA (b, NC, H) and dD (b, NC, H, P): per-chunk parts
    L, H, P, N, G, HPG, NC, C0, NCS, NSPLIT, HPP,
    Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
    HAS_D: tl.constexpr, D_PER_CHANNEL: tl.constexpr, STORE_DD: tl.constexpr, HAS_Z: tl.constexpr,
    LOAD_UNGATED: tl.constexpr, REVERSE: tl.constexpr, SIGNED: tl.constexpr, IEEE: tl.constexpr,
    ONE_BLOCK: tl.constexpr, STAGES: tl.constexpr,
):
    """Chunk C0 + program_id(0) of a walk of NCS chunks: states[b, k] is the state entering chunk C0 + k
    (k = NCS: leaving the walk), dstates[b, k] the gradient of the state leaving it; dB and dC go to
    (NSPLIT, batch, NCS * Q, G, N) parts in the walk's step order. With ONE_BLOCK (BP >= P) the loop over heads
    is the innermost, software-pipelined with STAGES stages (> 1: the next heads' loads in flight)."""
    k = tl.program_id(0)
    c = C0 + k
    b = tl.program_id(1).to(tl.int64)
    gs = tl.program_id(2)
    g = gs // NSPLIT
    split = gs % NSPLIT
    n = tl.arange(0, BN)
    nm = n < N
    pos, valid = _chunk_rows(c, L, Q, REVERSE)
    row = b * L + pos
    bm = valid[:, None] & nm[None, :]
    bo = (row[:, None] * G + g) * N + n[None, :]
    Bc = tl.load(B_ptr + bo, mask=bm, other=0.0)
    Cc = tl.load(C_ptr + bo, mask=bm, other=0.0)
    CB = _mm(Cc, tl.trans(Bc), IEEE)
    dB_acc = tl.zeros((Q, BN), dtype=tl.float32)
    dC_acc = tl.zeros((Q, BN), dtype=tl.float32)
    Mt_acc = tl.zeros((Q, Q), dtype=tl.float32)
    last = tl.arange(0, Q) == Q - 1
    for hh in tl.range(HPP, num_stages=STAGES):
        h = g * HPG + split * HPP + hh
        A_h = tl.load(A_ptr + h).to(tl.float32)
        dt = tl.load(dt_ptr + row * H + h, mask=valid, other=0.0)
        Lmat, d_in, d_out, d_all, lm = _decays(dt, A_h, Q, SIGNED)
        dcs = tl.zeros((Q,), dtype=tl.float32)
        ddt_u = tl.zeros((Q,), dtype=tl.float32)
        W = CB * Lmat  # (i, j): C_i . B_j times the decay from j to i
        if ONE_BLOCK:
            dB_acc, dC_acc, Mt_acc, dcs, ddt_u = _chunk_head_block(
                x_ptr, D_ptr, z_ptr, ungated_ptr, dout_ptr, states_ptr, dstates_ptr, dx_ptr, dD_ptr, dz_ptr,
                h, b, k, c, 0, row, valid, n, nm, Bc, Cc, CB, W, Lmat, dt, d_in, d_out, d_all, last,
                dB_acc, dC_acc, Mt_acc, dcs, ddt_u, H, P, N, NC, NCS,
                BP, HAS_D, D_PER_CHANNEL, STORE_DD, HAS_Z, LOAD_UNGATED, IEEE)
        else:
            for p0 in range(0, P, BP):
                dB_acc, dC_acc, Mt_acc, dcs, ddt_u = _chunk_head_block(
                    x_ptr, D_ptr, z_ptr, ungated_ptr, dout_ptr, states_ptr, dstates_ptr, dx_ptr, dD_ptr, dz_ptr,
                    h, b, k, c, p0, row, valid, n, nm, Bc, Cc, CB, W, Lmat, dt, d_in, d_out, d_all, last,
                    dB_acc, dC_acc, Mt_acc, dcs, ddt_u, H, P, N, NC, NCS,
                    BP, HAS_D, D_PER_CHANNEL, STORE_DD, HAS_Z, LOAD_UNGATED, IEEE)
        # d(lm_t) = sum_{k >= t} dcs_k: everything after step t in the chunk scales with its transition
        dlm = tl.sum(dcs, 0) - tl.cumsum(dcs, 0) + dcs
        if SIGNED:  # lm = log|2 exp(dA) - 1|: d lm / d dA = 2 exp(dA) / (2 exp(dA) - 1), 0 where clamped
            a = 2.0 * tl.exp(dt * A_h) - 1.0
            dA_t = tl.where(tl.abs(a) >= _TINY, dlm * (a + 1.0) / a, 0.0)
        else:
            dA_t = dlm
        tl.store(ddt_ptr + row * H + h, ddt_u + A_h * dA_t, mask=valid)
        tl.store(dA_ptr + (b * NC + c) * H + h, tl.sum(dt * dA_t, 0))
    rows = NCS * Q
    po = split * (tl.num_programs(1).to(tl.int64) * rows * G * N) \
        + ((b * rows + k * Q + tl.arange(0, Q))[:, None] * G + g) * N + n[None, :]
    dtype = x_ptr.dtype.element_ty
    Mt_c = Mt_acc.to(dtype)
    dB_acc += _mm(tl.trans(Mt_c), Cc, IEEE)
    dC_acc += _mm(Mt_c, Bc, IEEE)
    tl.store(dB_ptr + po, dB_acc, mask=bm)
    tl.store(dC_ptr + po, dC_acc, mask=bm)


@triton.jit
def _gate_bwd_kernel(dout_ptr, z_ptr, ungated_ptr, dy_ptr, dz_ptr, n, BLOCK: tl.constexpr):
    """The z gate's backward on its own, elementwise: out = y silu(z) gives dy = dout silu(z) and
    dz = dout y silu'(z), so the scan's backward then runs its ungated path on dy."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    do = tl.load(dout_ptr + i, mask=m, other=0.0).to(tl.float32)
    zv = tl.load(z_ptr + i, mask=m, other=0.0).to(tl.float32)
    y = tl.load(ungated_ptr + i, mask=m, other=0.0).to(tl.float32)
    sz = tl.sigmoid(zv)
    tl.store(dy_ptr + i, (do * zv * sz).to(dy_ptr.dtype.element_ty), mask=m)
    tl.store(dz_ptr + i, (do * y * sz * (1.0 + zv * (1.0 - sz))).to(dz_ptr.dtype.element_ty), mask=m)


@triton.jit
def _channel_dot_kernel(a_ptr, b_ptr, out_ptr, rows, cols, ROWS: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """out[i, col] = sum over rows i*ROWS .. (i+1)*ROWS - 1 of a[row, col] * b[row, col] in float32: D's gradient
    per channel (a = the ungated dout, b = x, rows = batch x length), summed over i afterwards."""
    i = tl.program_id(0).to(tl.int64)
    col = tl.program_id(1) * BC + tl.arange(0, BC)
    cm = col < cols
    acc = tl.zeros((BC,), dtype=tl.float32)
    for r0 in range(0, ROWS, BR):
        row = i * ROWS + r0 + tl.arange(0, BR)
        m = (row < rows)[:, None] & cm[None, :]
        off = row[:, None] * cols + col[None, :]
        a = tl.load(a_ptr + off, mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(a * tl.load(b_ptr + off, mask=m, other=0.0).to(tl.float32), 0)
    tl.store(out_ptr + i * cols + col, acc, mask=cm)
