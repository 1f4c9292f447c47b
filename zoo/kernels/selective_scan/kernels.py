"""Triton kernels for the selective scan (forward and backward).

One program owns BLOCK_D channels of one channel group, one sequence (a batch row or one packed
sequence) and one direction, with the full (d_state, BLOCK_D) float32 state in registers. It
walks the sequence in chunks of BLOCK_T steps: a chunk's inputs are loaded as 2-D tiles (one
wide load instead of BLOCK_T dependent ones), the recurrence inside the chunk is an associative
scan along the step axis of a (BLOCK_T, BLOCK_N, BLOCK_D) tile, and the state is carried from
chunk to chunk. The tile's axis order matters: Triton spreads lanes over the last axis first, so
channels go across lanes while steps (and most of the states) stay inside each thread; the scan
is then sequential in registers and the sum over states needs few shuffles.

Directions are index arithmetic, never copies: step s of the recurrence reads and writes sequence
position ``pos(s)``, where flag bit 0 reverses the order (pos = L-1-s) and bit 1 reads an
H x W image column-major (VMamba's cross-scan); every per-token tensor stays in its original order.

The backward recomputes the states of each chunk from the state saved at the chunk's start (the
forward saves one (d, n) state per chunk when gradients are needed), runs the adjoint scan
backwards over the chunk, and never needs the pre-gate output: y is recomputed from the states.

Negative eigenvalues (SIGNED, Grazzi et al.): the transition is a = 2 exp(dt A) - 1 in (-1, 1) instead of
exp(dt A). Everything that assumed a > 0 has a signed form compiled in only with SIGNED (the default
kernels are unchanged): a segment's total transition is its product of transitions, kept directly
(not exp(A sum dt)); the backward takes d a / d(dt A) = 2 exp(dt A) = a + 1 and the state before each
step h_{s-1} itself (from a shift of the recomputed states, not (h_s - b_s) / a, as a may be 0).
"""
import os

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# The interpreter cannot run inline PTX; it takes the library functions instead.
_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def _exp2_approx(x):
    # ex2.approx.ftz: one special-function op. tl.exp2 adds a compare and two multiplies per
    # element to keep denormal results, which the scan does not need (they only ever decay).
    if _INTERPRET:
        return tl.exp2(x)
    else:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)


@triton.jit
def _log2_approx(x):
    if _INTERPRET:
        return tl.log2(x)
    else:
        return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + _exp2_approx(-x * LOG2E))


@triton.jit
def _combine(a1, b1, a2, b2):
    # Composition of two steps x -> a x + b (the later step second). The adjoint scan runs it
    # over a flipped chunk, where the already-combined later steps come first.
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _shift_combine(v1, p1, f1, v2, p2, f2):
    # Summary of a run of rows: (last value, value before the last, 1 if that one is known). A
    # scan with it hands each row the previous row's value (row 0: its preset p), so the step
    # axis shifts by one without leaving registers. The step axis lies inside each thread, so the
    # flags are compile-time constants and fold away (checked in the sm_90 PTX: a float32 or a
    # boolean flag gives the same code).
    return v2, tl.where(f2 != 0.0, p2, v1), f1 + 1.0


@triton.jit
def _shift_down(v, first, first_row):
    """v shifted by one row along axis 0, ``first`` (broadcast over rows) entering row 0."""
    zero = tl.zeros(v.shape, dtype=tl.float32)
    _, prev, _ = tl.associative_scan((v, tl.where(first_row, first[None, :, :] + zero, zero),
                                      tl.where(first_row, 1.0 + zero, zero)), 0, _shift_combine)
    return prev


@triton.jit
def _positions(s, seqlen, flags, H, W, HAS_T: tl.constexpr):
    """Sequence position of recurrence step s (int tensor) for a direction's flags. The
    column-major mapping costs integer divisions, so it is compiled in only when some direction
    of the launch needs it (HAS_T)."""
    t = tl.where((flags & 1) != 0, seqlen - 1 - s, s)
    if HAS_T:
        t = tl.where((flags & 2) != 0, (t % H) * W + t // H, t)
    return t


@triton.jit
def _softplus(x):
    # log(1 + e^x) without overflow; above 20 it equals x in float32.
    return tl.where(x <= 20.0, LN2 * _log2_approx(1.0 + _exp2_approx(tl.minimum(x, 20.0) * LOG2E)), x)


@triton.jit
def _fwd_loads(u_base, dt_base, B_base, C_base, z_base, s, s_end, seqlen, start, flags, H, W, s_ul, s_dl, s_Bl, s_Cl,
               s_zl, dmask, nmask, HAS_T: tl.constexpr, HAS_Z: tl.constexpr, STORE_OUT: tl.constexpr):
    """One chunk's raw input tiles (steps s); masked rows and channels read as 0. C and z are only
    read when the output is stored (stand-ins are returned otherwise)."""
    smask = s < s_end
    t = start + _positions(s, seqlen, flags, H, W, HAS_T)
    m2 = smask[:, None] & dmask[None, :]
    mb = smask[:, None] & nmask[None, :]
    u = tl.load(u_base[None, :] + t[:, None] * s_ul, mask=m2, other=0.0)
    dt = tl.load(dt_base[None, :] + t[:, None] * s_dl, mask=m2, other=0.0)
    Bt = tl.load(B_base[None, :] + t[:, None] * s_Bl, mask=mb, other=0.0)
    Ct = Bt
    z = u
    if STORE_OUT:
        Ct = tl.load(C_base[None, :] + t[:, None] * s_Cl, mask=mb, other=0.0)
        if HAS_Z:
            z = tl.load(z_base[None, :] + t[:, None] * s_zl, mask=m2, other=0.0)
    return u, dt, Bt, Ct, z


@triton.jit
def _fwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dtb_ptr, h0_ptr, flags_ptr, cu_ptr, cs_ptr,
    out_ptr, hlast_ptr, hsave_ptr, dtsum_ptr,
    L, DPG, NSTATE, NBLK, GB_DIV, GC_DIV, H, W, NCHUNK, NSLOTS, SEGLEN, NSEG,
    s_uk, s_ub, s_ul, s_ud,
    s_dk, s_db, s_dl, s_dd,
    s_Ak, s_Ad, s_An,
    s_Bk, s_Bb, s_Bl, s_Bg, s_Bn,
    s_Ck, s_Cb, s_Cl, s_Cg, s_Cn,
    s_Dk, s_bk,
    s_zk, s_zb, s_zl, s_zd,
    s_hk, s_hb, s_hd, s_hn,
    s_ok, s_ob, s_ol, s_od,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DTB: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, SAVE: tl.constexpr, HAS_CU: tl.constexpr, STORE_OUT: tl.constexpr, HAS_T: tl.constexpr,
    SIGNED: tl.constexpr = False,
):
    """Program (channel block, sequence x segment, direction). A sequence may be cut into NSEG
    segments of SEGLEN steps (a multiple of BLOCK_T) to fill the GPU when there are few
    sequences and channels: pass 1 (STORE_OUT=False) scans each segment from a zero state and
    stores its end state and sum of dt (its total decay is exp(A sum dt)); _seg_combine_kernel
    chains them into true segment-start states; pass 2 (STORE_OUT) reruns every segment from its
    true start state. With NSEG = 1 this is one plain pass. SIGNED (transitions 2 exp(dt A) - 1, which
    may be negative): pass 1 stores the segment's product of transitions, (d, n) per segment, in
    dtsum_ptr instead of the sum of dt."""
    pid_d = tl.program_id(0)
    pid1 = tl.program_id(1)
    pid_b = pid1 // NSEG
    seg = pid1 % NSEG
    k = tl.program_id(2)
    g = pid_d // NBLK
    dl = (pid_d % NBLK) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dl < DPG
    d = g * DPG + dl
    n = tl.arange(0, BLOCK_N)
    nmask = n < NSTATE
    dn_mask = nmask[:, None] & dmask[None, :]
    flags = tl.load(flags_ptr + k)
    if HAS_CU:
        start = tl.load(cu_ptr + pid_b).to(tl.int64)
        seqlen = (tl.load(cu_ptr + pid_b + 1) - start).to(tl.int32)
        slot0 = tl.load(cs_ptr + pid_b).to(tl.int64)
        bb = 0
    else:
        start = 0
        seqlen = L
        slot0 = pid_b.to(tl.int64) * NCHUNK
        bb = pid_b.to(tl.int64)
    k64 = k.to(tl.int64)
    u_base = u_ptr + k64 * s_uk + bb * s_ub + d * s_ud
    dt_base = dt_ptr + k64 * s_dk + bb * s_db + d * s_dd
    B_base = B_ptr + k64 * s_Bk + bb * s_Bb + (g // GB_DIV) * s_Bg + n * s_Bn
    C_base = C_ptr + k64 * s_Ck + bb * s_Cb + (g // GC_DIV) * s_Cg + n * s_Cn
    o_base = out_ptr + k64 * s_ok + bb * s_ob + d * s_od
    z_base = z_ptr + k64 * s_zk + bb * s_zb + d * s_zd

    A = tl.load(A_ptr + k64 * s_Ak + n[:, None] * s_An + d[None, :] * s_Ad, mask=dn_mask, other=0.0).to(tl.float32)
    A2 = A * LOG2E  # exp(x) = exp2(x log2 e): one multiply folded into A
    if HAS_D:
        Dv = tl.load(D_ptr + k64 * s_Dk + d, mask=dmask, other=0.0).to(tl.float32)
    if HAS_DTB:
        dtb = tl.load(dtb_ptr + k64 * s_bk + d, mask=dmask, other=0.0).to(tl.float32)
    seq = k64 * tl.num_programs(1) + pid1  # index into (k, seqs x segments, d, n) state tensors
    state_off = n[:, None] * s_hn + d[None, :] * s_hd
    if HAS_H0:
        h = tl.load(h0_ptr + k64 * s_hk + pid1.to(tl.int64) * s_hb + state_off, mask=dn_mask, other=0.0).to(tl.float32)
    else:
        h = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dn_off = n[:, None] + d[None, :] * NSTATE  # contiguous (.., dim, d_state) layout of saved states
    DIMN = DPG * (tl.num_programs(0) // NBLK) * NSTATE
    rows = tl.arange(0, BLOCK_T)
    first_row = (rows == 0)[:, None, None]
    last_row = (rows == BLOCK_T - 1)[:, None, None]
    s0 = seg * SEGLEN
    s_end = tl.minimum(s0 + SEGLEN, seqlen)
    if not STORE_OUT:
        if SIGNED:
            segprod = tl.full((BLOCK_N, BLOCK_D), 1.0, dtype=tl.float32)
        else:
            dtsum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    # Software prefetch: each iteration issues the next chunk's loads before computing on the
    # current one, so their latency overlaps the scan (Triton does not pipeline these loads).
    u_n, dt_n, B_n, C_n, z_n = _fwd_loads(u_base, dt_base, B_base, C_base, z_base, s0 + rows, s_end, seqlen, start,
                                          flags, H, W, s_ul, s_dl, s_Bl, s_Cl, s_zl, dmask, nmask, HAS_T, HAS_Z,
                                          STORE_OUT)
    for c in range(0, tl.cdiv(s_end - s0, BLOCK_T)):
        if SAVE:
            tl.store(hsave_ptr + (k64 * NSLOTS + slot0 + s0 // BLOCK_T + c) * DIMN + dn_off, h, mask=dn_mask)
        s = s0 + c * BLOCK_T + rows
        smask = s < s_end
        t = start + _positions(s, seqlen, flags, H, W, HAS_T)
        m2 = smask[:, None] & dmask[None, :]
        u = u_n.to(tl.float32)
        dt = dt_n.to(tl.float32)
        Bt = B_n.to(tl.float32)
        Ct = C_n.to(tl.float32)
        z = z_n.to(tl.float32)
        u_n, dt_n, B_n, C_n, z_n = _fwd_loads(u_base, dt_base, B_base, C_base, z_base, s + BLOCK_T, s_end, seqlen,
                                              start, flags, H, W, s_ul, s_dl, s_Bl, s_Cl, s_zl, dmask, nmask, HAS_T,
                                              HAS_Z, STORE_OUT)
        if HAS_DTB:
            dt += dtb[None, :]
        if SOFTPLUS:
            dt = _softplus(dt)
        dt = tl.where(m2, dt, 0.0)  # padded steps: decay 1, no input, so the state passes through
        a = _exp2_approx(dt[:, None, :] * A2[None, :, :])
        if SIGNED:
            a = 2.0 * a - 1.0  # padded steps: 2 exp(0) - 1 = 1 still passes the state through
        b = (dt * u)[:, None, :] * Bt[:, :, None]
        # The carried state enters as part of the first step's input, so the scan's running
        # product of decays is never used and the compiler drops it (except in the signed
        # first pass, which keeps the chunk's product of transitions).
        b = tl.where(first_row, b + a * h[None, :, :], b)
        if SIGNED and not STORE_OUT:
            aprod, hs = tl.associative_scan((a, b), 0, _combine)
            segprod = segprod * tl.sum(tl.where(last_row, aprod, 0.0), axis=0)
        else:
            _, hs = tl.associative_scan((a, b), 0, _combine)
        if STORE_OUT:
            y = tl.sum(hs * Ct[:, :, None], axis=1)
            if HAS_D:
                y += Dv[None, :] * u
            if HAS_Z:
                y = y * z * _sigmoid(z)
            tl.store(o_base[None, :] + t[:, None] * s_ol, y.to(out_ptr.dtype.element_ty), mask=m2)
        else:
            if not SIGNED:
                dtsum += tl.sum(dt, axis=0)
        h = tl.sum(tl.where(last_row, hs, 0.0), axis=0)
    tl.store(hlast_ptr + seq * DIMN + dn_off, h, mask=dn_mask)
    if not STORE_OUT:
        if SIGNED:
            tl.store(dtsum_ptr + seq * DIMN + dn_off, segprod, mask=dn_mask)
        else:
            tl.store(dtsum_ptr + seq * (DPG * (tl.num_programs(0) // NBLK)) + d, dtsum, mask=dmask)


@triton.jit
def _seg_combine_kernel(
    end_ptr, dtsum_ptr, A_ptr, init_ptr, start_ptr, final_ptr,
    NSEG, DIM, NSTATE, s_Ak, s_Ad, s_An,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, HAS_INIT: tl.constexpr, BACKWARD: tl.constexpr,
    SIGNED: tl.constexpr = False,
):
    """Chains per-segment results computed from zero: x_start(seg) = carry;
    carry = exp(A * dtsum(seg)) * carry + end(seg), over segments in order (the states) or in
    reverse order (BACKWARD: the adjoints). Buffers are (K, seqs x NSEG, DIM, NSTATE) contiguous,
    dtsum (K, seqs x NSEG, DIM); init and final (K, seqs, DIM, NSTATE). SIGNED: dtsum_ptr holds each
    segment's product of (possibly negative) transitions, (K, seqs x NSEG, DIM, NSTATE), used as is."""
    d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    dmask = d < DIM
    m = dmask[:, None] & (n < NSTATE)[None, :]
    k = tl.program_id(2).to(tl.int64)
    sq = k * tl.num_programs(1) + tl.program_id(1)
    A2 = tl.load(A_ptr + k * s_Ak + d[:, None] * s_Ad + n[None, :] * s_An, mask=m, other=0.0).to(tl.float32) * LOG2E
    off = d[:, None] * NSTATE + n[None, :]
    if HAS_INIT:
        carry = tl.load(init_ptr + sq * DIM * NSTATE + off, mask=m, other=0.0)
    else:
        carry = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    for i in range(0, NSEG):
        if BACKWARD:
            j = sq * NSEG + NSEG - 1 - i
        else:
            j = sq * NSEG + i
        tl.store(start_ptr + j * DIM * NSTATE + off, carry, mask=m)
        if SIGNED:
            prod = tl.load(dtsum_ptr + j * DIM * NSTATE + off, mask=m, other=0.0)
            carry = prod * carry + tl.load(end_ptr + j * DIM * NSTATE + off, mask=m, other=0.0)
        else:
            ds = tl.load(dtsum_ptr + j * DIM + d, mask=dmask, other=0.0)
            carry = _exp2_approx(ds[:, None] * A2) * carry + tl.load(end_ptr + j * DIM * NSTATE + off, mask=m,
                                                                    other=0.0)
    tl.store(final_ptr + sq * DIM * NSTATE + off, carry, mask=m)


@triton.jit
def _bwd_loads(u_base, dt_base, B_base, C_base, z_base, go_base, hs_ptr, s, s_lo, s_end, seqlen, start, flags, H, W,
               s_ul, s_dl, s_Bl, s_Cl, s_zl, s_gl, dmask, nmask, dn_mask, HAS_T: tl.constexpr, HAS_Z: tl.constexpr,
               ADJ_ONLY: tl.constexpr):
    """One backward chunk's raw input tiles (steps s): the next step's delta (its decay carries
    the adjoint back), C, dout, z, and unless ADJ_ONLY, u, delta, B and the chunk-start state at
    hs_ptr. Rows outside [s_lo, s_end) read as 0; stand-ins are returned for tiles not read."""
    smask = (s >= s_lo) & (s < s_end)
    t = start + _positions(s, seqlen, flags, H, W, HAS_T)
    m2 = smask[:, None] & dmask[None, :]
    mb = smask[:, None] & nmask[None, :]
    s1 = s + 1
    t1 = start + _positions(s1, seqlen, flags, H, W, HAS_T)
    dt1 = tl.load(dt_base[None, :] + t1[:, None] * s_dl, mask=(smask & (s1 < seqlen))[:, None] & dmask[None, :],
                  other=0.0)
    Ct = tl.load(C_base[None, :] + t[:, None] * s_Cl, mask=mb, other=0.0)
    dout = tl.load(go_base[None, :] + t[:, None] * s_gl, mask=m2, other=0.0)
    z = dout
    if HAS_Z:
        z = tl.load(z_base[None, :] + t[:, None] * s_zl, mask=m2, other=0.0)
    u = dout
    draw = dt1
    Bt = Ct
    h_in = tl.zeros(dn_mask.shape, dtype=tl.float32)
    if not ADJ_ONLY:
        u = tl.load(u_base[None, :] + t[:, None] * s_ul, mask=m2, other=0.0)
        draw = tl.load(dt_base[None, :] + t[:, None] * s_dl, mask=m2, other=0.0)
        Bt = tl.load(B_base[None, :] + t[:, None] * s_Bl, mask=mb, other=0.0)
        h_in = tl.load(hs_ptr, mask=dn_mask, other=0.0)
    return dt1, Ct, dout, z, u, draw, Bt, h_in


@triton.jit
def _bwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dtb_ptr, flags_ptr, cu_ptr, cs_ptr,
    hsave_ptr, dout_ptr, dlast_ptr,
    du_ptr, ddt_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, ddtb_ptr, dh0_ptr, dtsum_ptr,
    L, DPG, NSTATE, NBLK, GB_DIV, GC_DIV, H, W, NCHUNK, NSLOTS, SEGLEN, NSEG,
    s_uk, s_ub, s_ul, s_ud,
    s_dk, s_db, s_dl, s_dd,
    s_Ak, s_Ad, s_An,
    s_Bk, s_Bb, s_Bl, s_Bg, s_Bn,
    s_Ck, s_Cb, s_Cl, s_Cg, s_Cn,
    s_Dk, s_bk,
    s_zk, s_zb, s_zl, s_zd,
    s_gk, s_gb, s_gl, s_gd,
    s_dBp, s_dBk, s_dBb, s_dBl, s_dBg,
    s_dCp, s_dCk, s_dCb, s_dCl, s_dCg,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DTB: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_DLAST: tl.constexpr, HAS_CU: tl.constexpr, DETERMINISTIC: tl.constexpr, ADJ_ONLY: tl.constexpr,
    HAS_T: tl.constexpr, SIGNED: tl.constexpr = False,
):
    """Gradients. Per chunk (last to first): recompute the states from the saved chunk-start
    state, recompute y for the gate's derivative, then the adjoint g_s = C_s dy_s + a_{s+1} g_{s+1}
    by a reverse scan. Per-token grads (du, ddelta, dz) are stored; dB/dC are reduced over the
    program's channels first, then added (atomics, or per-block partial rows when
    DETERMINISTIC); dA, dD, ddelta_bias are summed over the chunk loop in registers and stored
    once per program as partials that the wrapper sums.

    Segments (NSEG > 1) work as in the forward: pass 1 (ADJ_ONLY) runs only the adjoint scan of
    each segment from a zero carry and stores the adjoint at the segment's start (in dh0_ptr) and
    the sum of the shifted dt (in dtsum_ptr); _seg_combine_kernel chains them backwards; pass 2
    starts every segment from its true carry (read through dlast_ptr).

    SIGNED (transitions a = 2 exp(dt A) - 1): d a / d(dt A) = a + 1, applied to the state before each
    step (a shift of the recomputed states; the default's h_s - b_s = a h_{s-1} is not enough), and
    pass 1 stores the segment's product of transitions, (d, n), in dtsum_ptr."""
    pid_d = tl.program_id(0)
    pid1 = tl.program_id(1)
    pid_b = pid1 // NSEG
    seg = pid1 % NSEG
    k = tl.program_id(2)
    g = pid_d // NBLK
    dl = (pid_d % NBLK) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dl < DPG
    d = g * DPG + dl
    n = tl.arange(0, BLOCK_N)
    nmask = n < NSTATE
    dn_mask = nmask[:, None] & dmask[None, :]
    flags = tl.load(flags_ptr + k)
    if HAS_CU:
        start = tl.load(cu_ptr + pid_b).to(tl.int64)
        seqlen = (tl.load(cu_ptr + pid_b + 1) - start).to(tl.int32)
        slot0 = tl.load(cs_ptr + pid_b).to(tl.int64)
        bb = 0
    else:
        start = 0
        seqlen = L
        slot0 = pid_b.to(tl.int64) * NCHUNK
        bb = pid_b.to(tl.int64)
    k64 = k.to(tl.int64)
    u_base = u_ptr + k64 * s_uk + bb * s_ub + d * s_ud
    dt_base = dt_ptr + k64 * s_dk + bb * s_db + d * s_dd
    gB = g // GB_DIV
    gC = g // GC_DIV
    B_base = B_ptr + k64 * s_Bk + bb * s_Bb + gB * s_Bg + n * s_Bn
    C_base = C_ptr + k64 * s_Ck + bb * s_Cb + gC * s_Cg + n * s_Cn
    # Per-token gradient buffers share one contiguous (k, b, l, d) layout.
    tok = k64 * s_gk + bb * s_gb + d * s_gd
    go_base = dout_ptr + tok
    z_base = z_ptr + k64 * s_zk + bb * s_zb + d * s_zd  # read only when HAS_Z
    if DETERMINISTIC:
        # Row of the partial buffer: this program's block index among those sharing the group.
        dB_base = dB_ptr + ((g % GB_DIV) * NBLK + pid_d % NBLK) * s_dBp
        dC_base = dC_ptr + ((g % GC_DIV) * NBLK + pid_d % NBLK) * s_dCp
    else:
        dB_base = dB_ptr
        dC_base = dC_ptr
    dB_base += k64 * s_dBk + bb * s_dBb + gB * s_dBg + n
    dC_base += k64 * s_dCk + bb * s_dCb + gC * s_dCg + n

    A = tl.load(A_ptr + k64 * s_Ak + n[:, None] * s_An + d[None, :] * s_Ad, mask=dn_mask, other=0.0).to(tl.float32)
    A2 = A * LOG2E
    if HAS_D:
        Dv = tl.load(D_ptr + k64 * s_Dk + d, mask=dmask, other=0.0).to(tl.float32)
    if HAS_DTB:
        dtb = tl.load(dtb_ptr + k64 * s_bk + d, mask=dmask, other=0.0).to(tl.float32)
    seq = k64 * tl.num_programs(1) + pid1
    DIMN = DPG * (tl.num_programs(0) // NBLK) * NSTATE
    DIM = DPG * (tl.num_programs(0) // NBLK)
    dn_off = n[:, None] + d[None, :] * NSTATE
    if HAS_DLAST:
        gcar = tl.load(dlast_ptr + seq * DIMN + dn_off, mask=dn_mask, other=0.0).to(tl.float32)
    else:
        gcar = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dA_acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dtb_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if SIGNED:
        segprod = tl.full((BLOCK_N, BLOCK_D), 1.0, dtype=tl.float32)
    else:
        dt1sum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    rows = tl.arange(0, BLOCK_T)
    first_row = (rows == 0)[:, None, None]
    last_row = (rows == BLOCK_T - 1)[:, None, None]
    s0 = seg * SEGLEN
    s_end = tl.minimum(s0 + SEGLEN, seqlen)
    nch = tl.cdiv(s_end - s0, BLOCK_T)
    hs_base = hsave_ptr + (k64 * NSLOTS + slot0 + s0 // BLOCK_T) * DIMN + dn_off
    # Software prefetch as in the forward: the previous chunk's loads are issued before this
    # chunk's scans, so their latency overlaps the computation.
    c = nch - 1
    dt1_n, C_n, dout_n, z_n, u_n, draw_n, B_n, h_n = _bwd_loads(
        u_base, dt_base, B_base, C_base, z_base, go_base, hs_base + c * DIMN, s0 + c * BLOCK_T + rows, s0, s_end, seqlen,
        start, flags, H, W, s_ul, s_dl, s_Bl, s_Cl, s_zl, s_gl, dmask, nmask, dn_mask & (nch > 0), HAS_T, HAS_Z, ADJ_ONLY)
    for ci in range(0, nch):
        c = nch - 1 - ci
        s = s0 + c * BLOCK_T + rows
        smask = s < s_end
        t = start + _positions(s, seqlen, flags, H, W, HAS_T)
        m2 = smask[:, None] & dmask[None, :]
        mb = smask[:, None] & nmask[None, :]
        m21 = ((s + 1) < seqlen)[:, None] & dmask[None, :]
        dt1 = dt1_n.to(tl.float32)
        Ct = C_n.to(tl.float32)
        dout = dout_n.to(tl.float32)
        z = z_n.to(tl.float32)
        u = u_n.to(tl.float32)
        draw = draw_n.to(tl.float32)
        Bt = B_n.to(tl.float32)
        h_in = h_n
        # Past the first chunk (c = 0) every row is below s0, so that prefetch reads nothing.
        dt1_n, C_n, dout_n, z_n, u_n, draw_n, B_n, h_n = _bwd_loads(
            u_base, dt_base, B_base, C_base, z_base, go_base, hs_base + (c - 1) * DIMN, s - BLOCK_T, s0, s_end,
            seqlen, start, flags, H, W, s_ul, s_dl, s_Bl, s_Cl, s_zl, s_gl, dmask, nmask,
            dn_mask & (c > 0), HAS_T, HAS_Z, ADJ_ONLY)
        if HAS_DTB:
            dt1 += dtb[None, :]
        if SOFTPLUS:
            dt1 = _softplus(dt1)
        dt1 = tl.where(m21, dt1, 0.0)  # past the end: decay 1, so dlast enters unchanged
        if HAS_Z:
            sz = _sigmoid(z)
            dy = dout * z * sz
        else:
            dy = dout
        an = _exp2_approx(dt1[:, None, :] * A2[None, :, :])
        if SIGNED:
            an = 2.0 * an - 1.0
        # The adjoint runs backwards in time: a forward scan over the flipped chunk. Triton's
        # reverse=True scan cost ~640 warp shuffles per chunk here (it goes through the lanes
        # although the step axis lies inside each thread); the flips are register renames.
        # (The carried adjoint enters with the chunk's last step, as the state does in the forward.)
        x = Ct[:, :, None] * dy[:, None, :]
        x = tl.where(last_row, x + an * gcar[None, :, :], x)
        if SIGNED and ADJ_ONLY:
            # The flipped running product's last row is the chunk's product of transitions.
            aprod, gs = tl.associative_scan((tl.flip(an, 0), tl.flip(x, 0)), 0, _combine)
            segprod = segprod * tl.sum(tl.where(last_row, aprod, 0.0), axis=0)
        else:
            _, gs = tl.associative_scan((tl.flip(an, 0), tl.flip(x, 0)), 0, _combine)
        gs = tl.flip(gs, 0)
        gcar = tl.sum(tl.where(first_row, gs, 0.0), axis=0)
        if ADJ_ONLY:
            if not SIGNED:
                dt1sum += tl.sum(dt1, axis=0)
        else:
            if HAS_DTB:
                draw += dtb[None, :]
            dt = draw
            if SOFTPLUS:
                dt = _softplus(draw)
            dt = tl.where(m2, dt, 0.0)
            dtu = dt * u
            b = dtu[:, None, :] * Bt[:, :, None]
            a = _exp2_approx(dt[:, None, :] * A2[None, :, :])
            if SIGNED:
                a = 2.0 * a - 1.0
            _, hs = tl.associative_scan((a, tl.where(first_row, b + a * h_in[None, :, :], b)), 0, _combine)
            if HAS_Z:
                y = tl.sum(hs * Ct[:, :, None], axis=1)
                if HAS_D:
                    y += Dv[None, :] * u
                dz = dout * y * sz * (1.0 + z * (1.0 - sz))
                tl.store(dz_ptr + tok[None, :] + t[:, None] * s_gl, dz.to(dz_ptr.dtype.element_ty), mask=m2)
            if SIGNED:
                # d a / d(dt A) = 2 exp(dt A) = a + 1, times the state before the step, h_{s-1}.
                gh = gs * (a + 1.0) * _shift_down(hs, h_in, first_row)
            else:
                hb = hs - b  # = exp(dt A) h_{s-1}: the decayed previous state, without a shifted tile
                gh = gs * hb
            gB_ = tl.sum(gs * Bt[:, :, None], axis=1)
            du = dt * gB_
            if HAS_D:
                du += Dv[None, :] * dy
                dD_acc += tl.sum(tl.where(m2, dy * u, 0.0), axis=0)
            ddt = u * gB_ + tl.sum(gh * A[None, :, :], axis=1)
            dA_acc += tl.sum(gh * dt[:, None, :], axis=0)
            if SOFTPLUS:
                ddt = ddt * _sigmoid(draw)
            ddt = tl.where(m2, ddt, 0.0)
            if HAS_DTB:
                dtb_acc += tl.sum(ddt, axis=0)
            tl.store(du_ptr + tok[None, :] + t[:, None] * s_gl, du.to(du_ptr.dtype.element_ty), mask=m2)
            tl.store(ddt_ptr + tok[None, :] + t[:, None] * s_gl, ddt.to(ddt_ptr.dtype.element_ty), mask=m2)
            dBt = tl.sum(gs * dtu[:, None, :], axis=2)
            dCt = tl.sum(hs * dy[:, None, :], axis=2)
            if DETERMINISTIC:
                tl.store(dB_base[None, :] + t[:, None] * s_dBl, dBt, mask=mb)
                tl.store(dC_base[None, :] + t[:, None] * s_dCl, dCt, mask=mb)
            else:
                tl.atomic_add(dB_base[None, :] + t[:, None] * s_dBl, dBt, mask=mb)
                tl.atomic_add(dC_base[None, :] + t[:, None] * s_dCl, dCt, mask=mb)
    if ADJ_ONLY:
        tl.store(dh0_ptr + seq * DIMN + dn_off, gcar, mask=dn_mask)
        if SIGNED:
            tl.store(dtsum_ptr + seq * DIMN + dn_off, segprod, mask=dn_mask)
        else:
            tl.store(dtsum_ptr + seq * DIM + d, dt1sum, mask=dmask)
    else:
        # Gradient of the state entering the segment: its first step's adjoint through that
        # step's decay (for segment 0 this is the initial state's gradient).
        t0 = start + _positions(rows * 0 + s0, seqlen, flags, H, W, HAS_T)
        m0 = ((rows == 0) & (s_end > s0))[:, None] & dmask[None, :]
        dt0 = tl.load(dt_base[None, :] + t0[:, None] * s_dl, mask=m0, other=0.0)
        dt0 = tl.sum(dt0.to(tl.float32), axis=0)
        if HAS_DTB:
            dt0 += dtb
        if SOFTPLUS:
            dt0 = _softplus(dt0)
        dt0 = tl.where(s_end > s0, dt0, 0.0)  # an empty sequence passes dlast straight to dh0
        if SIGNED:
            dh0 = gcar * (2.0 * _exp2_approx(dt0[None, :] * A2) - 1.0)
        else:
            dh0 = gcar * _exp2_approx(dt0[None, :] * A2)
        tl.store(dh0_ptr + seq * DIMN + dn_off, dh0, mask=dn_mask)
        tl.store(dA_ptr + seq * DIMN + dn_off, dA_acc, mask=dn_mask)
        if HAS_D:
            tl.store(dD_ptr + seq * DIM + d, dD_acc, mask=dmask)
        if HAS_DTB:
            tl.store(ddtb_ptr + seq * DIM + d, dtb_acc, mask=dmask)
