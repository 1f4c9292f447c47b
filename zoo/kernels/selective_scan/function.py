"""Launchers, the torch.library custom ops (with fake and autograd registrations) and the public
entry points for the Triton selective scan.

Internally every call is a stack of K directions: u, delta, z (K, b, l, d); A (K, d, n);
B, C (K, b, l, g, n); D, delta_bias (K, d); initial_state (K, seqs, d, n). A tensor shared by
all directions is an expanded view (stride 0 along K), so nothing is copied; autograd sums the
per-direction gradients of such a view.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Optional, Sequence

import torch

from ..launch import cdiv, next_power_of_2
from .kernels import _bwd_kernel, _fwd_kernel, _seg_combine_kernel

REVERSE, TRANSPOSE = 1, 2  # direction flag bits (see kernels._positions)


@functools.lru_cache(maxsize=256)
def _config(d_state: int, dpg: int, backward: bool, block_t: Optional[int] = None, block_d: Optional[int] = None):
    """(BLOCK_T, BLOCK_D, BLOCK_N, num_warps). Lanes go to channels first, then to states, warps
    after them; each thread then holds about 32 values of each (BLOCK_T, BLOCK_N, BLOCK_D) tile
    in the backward (16 for d_state > 16), so it does not spill. Few channels per program keep
    many programs in flight. The backward uses the forward's BLOCK_T: it reads the states saved
    at the forward's chunk starts.

    Measured on an H200 at d_state 16 (benchmarks/results/kernels_h200_sweep.json, LM rows):
    the forward is fastest with twice the backward's channels per program (T8 x D16, one warp:
    0.71 ms against 0.84 ms at T8 x D8), the backward with T8 x D8 (wider tiles spill)."""
    bn = next_power_of_2(d_state)
    bd = block_d or max(1, min(128 // bn if bn < 16 else 8, 64, next_power_of_2(dpg)))
    warps = max(1, min(8, bn * bd // 128))
    bt = block_t or max(2, min(32, 1024 * warps // (bn * bd)))
    if backward and not block_d and bn > 16:
        bd = max(1, bd // 2)
        warps = max(1, min(8, bn * bd // 128))
    if not backward and not block_d and bn == 16:
        bd = min(2 * bd, max(bd, next_power_of_2(dpg)))
    return bt, bd, bn, warps


# Fewer programs than _SEGMENT_BELOW (channel blocks x sequences x directions) leave SMs idle:
# the sequence is then cut into segments scanned in parallel and chained (about twice the work),
# enough of them for about _TARGET_PROGRAMS programs. Measured at (1, 65536, 1536, 16) on an H200
# (kernels_h200_sweep.json, "long" rows): 1024 programs 3.0 ms forward / 16.1 ms forward+backward,
# 4096 programs 2.1 / 9.4 ms, 8192 no better.
_SEGMENT_BELOW = 512
_TARGET_PROGRAMS = 4096


def _segments(nprog: int, L: int, block_t: int, packed: bool):
    """(NSEG, SEGLEN): one segment unless too few programs fill the GPU."""
    if packed or nprog >= _SEGMENT_BELOW:
        return 1, max(L, 1)
    nseg = min(cdiv(_TARGET_PROGRAMS, nprog), max(1, L // (8 * block_t)))
    seglen = cdiv(cdiv(L, nseg), block_t) * block_t  # whole chunks: saved states align
    return cdiv(L, seglen), seglen


def _chain(end, dtsum, A, init, nseq, backward, signed=False):
    """Runs _seg_combine_kernel: segment-start values (K, seqs x NSEG, d, n) and the final one.
    ``dtsum``: each segment's sum of dt (K, seqs x NSEG, d), or with ``signed`` its product of
    transitions (K, seqs x NSEG, d, n)."""
    K, _, dim, n = end.shape
    start = torch.empty_like(end)
    final = torch.empty((K, nseq, dim, n), dtype=torch.float32, device=end.device)
    bn = next_power_of_2(n)
    bd = max(1, min(64, 2048 // bn))
    _seg_combine_kernel[(cdiv(dim, bd), nseq, K)](
        end, dtsum, A, init if init is not None else end, start, final, end.shape[1] // nseq, dim, n, *A.stride(),
        BLOCK_D=bd, BLOCK_N=bn, HAS_INIT=init is not None, BACKWARD=backward, SIGNED=signed,
    )
    return start, final


def _lcm(a: int, b: int) -> int:
    return a * b // math.gcd(a, b)


def _strides4(t):
    """(K, b, l, d) strides; a 3-D tensor shared by all directions reads with K-stride 0."""
    return (0, *t.stride()) if t.dim() == 3 else t.stride()


def _geometry(u, A, B, C, cu_seqlens, block_t):
    K, batch, L, dim = A.shape[0], *u.shape[-3:]
    gb, gc = B.shape[3], C.shape[3]
    G = _lcm(gb, gc)  # a program's channels lie inside one group of B and one group of C
    nseq = batch if cu_seqlens is None else cu_seqlens.numel() - 1
    nchunk = cdiv(L, block_t)
    # Saved chunk-start states: per packed sequence ceil(len/T) slots, at most ceil(L/T) + nseq
    # in all, so the size is known without reading cu_seqlens on the host.
    nslots = batch * nchunk if cu_seqlens is None else nchunk + nseq
    return K, batch, L, dim, G, dim // G, nseq, nchunk, nslots


def _chunk_starts(cu_seqlens, block_t):
    lens = cu_seqlens[1:] - cu_seqlens[:-1]
    n = (lens + block_t - 1) // block_t
    return (torch.cumsum(n, 0) - n).to(torch.int64)


def _common_args(u, delta, A, B, C, D, z, delta_bias, flags, cu_seqlens, cs, H, W, block_t):
    K, batch, L, dim, G, dpg, nseq, nchunk, nslots = _geometry(u, A, B, C, cu_seqlens, block_t)
    dummy = u
    return (
        [u, delta, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
         delta_bias if delta_bias is not None else dummy, flags,
         cu_seqlens if cu_seqlens is not None else flags, cs if cs is not None else flags],
        dict(L=L, DPG=dpg, NSTATE=A.shape[2], GB_DIV=G // B.shape[3], GC_DIV=G // C.shape[3], H=H, W=W,
             NCHUNK=nchunk, NSLOTS=nslots),
        [*_strides4(u), *delta.stride(), *A.stride(), *B.stride(), *C.stride(),
         D.stride(0) if D is not None else 0, delta_bias.stride(0) if delta_bias is not None else 0,
         *(_strides4(z) if z is not None else (0, 0, 0, 0))],
        (K, batch, L, dim, G, dpg, nseq, nchunk, nslots),
    )


@torch.library.custom_op("zoo::selective_scan_fwd", mutates_args=())
def _scan_fwd(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
    initial_state: Optional[torch.Tensor], flags: torch.Tensor, cu_seqlens: Optional[torch.Tensor],
    H: int, W: int, delta_softplus: bool, save_states: bool, block_t: int, block_d: int,
    negative_eigenvalues: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns out (K, b, l, d) in u's dtype, the float32 final state (K, seqs, d, n) and the
    float32 chunk-start states saved for the backward (empty unless save_states).
    ``negative_eigenvalues``: transitions 2 exp(dt A) - 1 (the kernels' SIGNED variant)."""
    cs = None if cu_seqlens is None else _chunk_starts(cu_seqlens, block_t)
    ptrs, sizes, strides, geo = _common_args(u, delta, A, B, C, D, z, delta_bias, flags, cu_seqlens, cs, H, W, block_t)
    K, batch, L, dim, G, dpg, nseq, nchunk, nslots = geo
    n = A.shape[2]
    _, bd, bn, warps = _config(n, dpg, False, block_t, block_d)
    out = torch.empty((K, batch, L, dim), dtype=u.dtype, device=u.device)
    hlast = torch.empty((K, nseq, dim, n), dtype=torch.float32, device=u.device)
    hsave = torch.empty((K, nslots, dim, n) if save_states else (0,), dtype=torch.float32, device=u.device)
    nblk = cdiv(dpg, bd)
    nseg, seglen = _segments(G * nblk * nseq * K, L, block_t, cu_seqlens is not None)
    grid = (G * nblk, nseq * nseg, K)

    def launch(h0, hlast_out, dtsum, store_out, save):
        _fwd_kernel[grid](
            *ptrs[:8], h0 if h0 is not None else hlast_out, *ptrs[8:], out, hlast_out, hsave, dtsum,
            sizes["L"], dpg, n, nblk, sizes["GB_DIV"], sizes["GC_DIV"], H, W, nchunk, nslots, seglen, nseg,
            *strides,
            *(h0.stride() if h0 is not None else (0, 0, 0, 0)),
            *out.stride(),
            BLOCK_T=block_t, BLOCK_D=bd, BLOCK_N=bn,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_DTB=delta_bias is not None, SOFTPLUS=delta_softplus,
            HAS_H0=h0 is not None, SAVE=save, HAS_CU=cu_seqlens is not None, STORE_OUT=store_out, HAS_T=H * W > 1,
            SIGNED=negative_eigenvalues, num_warps=warps,
        )

    if nseg == 1:
        launch(initial_state, hlast, hlast, True, save_states)
    else:
        ends = torch.empty((K, nseq * nseg, dim, n), dtype=torch.float32, device=u.device)
        # Per segment: its sum of dt, or with negative eigenvalues its product of transitions per state.
        dtsum = torch.empty((K, nseq * nseg, dim, n) if negative_eigenvalues else (K, nseq * nseg, dim),
                            dtype=torch.float32, device=u.device)
        launch(None, ends, dtsum, False, False)
        h0 = None if initial_state is None else initial_state.float().contiguous()
        starts, _ = _chain(ends, dtsum, A, h0, nseq, backward=False, signed=negative_eigenvalues)
        launch(starts, ends, dtsum, True, save_states)
        hlast = ends.view(K, nseq, nseg, dim, n)[:, :, -1].contiguous()
    return out, hlast, hsave


@_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, initial_state, flags, cu_seqlens, H, W, delta_softplus, save_states,
      block_t, block_d, negative_eigenvalues=False):
    K, batch, L, dim, G, dpg, nseq, nchunk, nslots = _geometry(u, A, B, C, cu_seqlens, block_t)
    n = A.shape[2]
    return (
        u.new_empty((K, batch, L, dim)),
        u.new_empty((K, nseq, dim, n), dtype=torch.float32),
        u.new_empty((K, nslots, dim, n) if save_states else (0,), dtype=torch.float32),
    )


@torch.library.custom_op("zoo::selective_scan_bwd", mutates_args=())
def _scan_bwd(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
    flags: torch.Tensor, cu_seqlens: Optional[torch.Tensor], hsave: torch.Tensor, dout: torch.Tensor,
    dlast: Optional[torch.Tensor], H: int, W: int, delta_softplus: bool, block_t: int, block_d: int,
    deterministic: bool, negative_eigenvalues: bool = False,
) -> list[torch.Tensor]:
    """Returns [du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state], shaped like the
    inputs (empty tensors for absent optional inputs)."""
    cs = None if cu_seqlens is None else _chunk_starts(cu_seqlens, block_t)
    ptrs, sizes, strides, geo = _common_args(u, delta, A, B, C, D, z, delta_bias, flags, cu_seqlens, cs, H, W, block_t)
    K, batch, L, dim, G, dpg, nseq, nchunk, nslots = geo
    n = A.shape[2]
    gb, gc = B.shape[3], C.shape[3]
    _, bd, bn, warps = _config(n, dpg, True, block_t, block_d)
    nblk = cdiv(dpg, bd)
    dev = u.device
    dout = dout.contiguous()
    # u and z shared by all directions: per-direction grads in float32, summed once below.
    du = torch.empty((K, batch, L, dim), dtype=u.dtype if u.dim() == 4 else torch.float32, device=dev)
    ddt = torch.empty((K, batch, L, dim), dtype=delta.dtype, device=dev)
    dz = du
    if z is not None:
        dz = torch.empty((K, batch, L, dim), dtype=z.dtype if z.dim() == 4 else torch.float32, device=dev)
    if deterministic:
        # One partial row per channel block sharing a group, summed below in a fixed order.
        dB = torch.empty((nblk * (G // gb), K, batch, L, gb, n), dtype=torch.float32, device=dev)
        dC = torch.empty((nblk * (G // gc), K, batch, L, gc, n), dtype=torch.float32, device=dev)
    else:
        dB = torch.zeros((1, K, batch, L, gb, n), dtype=torch.float32, device=dev)
        dC = torch.zeros((1, K, batch, L, gc, n), dtype=torch.float32, device=dev)
    nseg, seglen = _segments(G * nblk * nseq * K, L, block_t, cu_seqlens is not None)
    dA = torch.empty((K, nseq * nseg, dim, n), dtype=torch.float32, device=dev)
    dD = torch.empty((K, nseq * nseg, dim), dtype=torch.float32, device=dev)
    ddtb = torch.empty((K, nseq * nseg, dim), dtype=torch.float32, device=dev)
    dh0 = torch.empty((K, nseq * nseg, dim, n), dtype=torch.float32, device=dev)
    dtsum = dD  # read only by the segmented first pass, which gets its own buffer below

    def launch(dlast, adj_only):
        _bwd_kernel[(G * nblk, nseq * nseg, K)](
            *ptrs, hsave, dout, dlast if dlast is not None else dh0,
            du, ddt, dz, dB, dC, dA, dD, ddtb, dh0, dtsum,
            sizes["L"], dpg, n, nblk, sizes["GB_DIV"], sizes["GC_DIV"], H, W, nchunk, nslots, seglen, nseg,
            *strides,
            *du.stride(),
            dB.stride(0), *dB.stride()[1:5],
            dC.stride(0), *dC.stride()[1:5],
            BLOCK_T=block_t, BLOCK_D=bd, BLOCK_N=bn,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_DTB=delta_bias is not None, SOFTPLUS=delta_softplus,
            HAS_DLAST=dlast is not None, HAS_CU=cu_seqlens is not None, DETERMINISTIC=deterministic,
            ADJ_ONLY=adj_only, HAS_T=H * W > 1, SIGNED=negative_eigenvalues, num_warps=warps,
        )

    if nseg > 1:
        dtsum = torch.empty((K, nseq * nseg, dim, n) if negative_eigenvalues else (K, nseq * nseg, dim),
                            dtype=torch.float32, device=dev)
        launch(None, True)  # each segment's adjoint at its start, from a zero carry (into dh0)
        dlast = None if dlast is None else dlast.float().contiguous()
        dlast, _ = _chain(dh0.clone(), dtsum, A, dlast, nseq, backward=True, signed=negative_eigenvalues)
    launch(dlast, False)
    dh0 = dh0.view(K, nseq, nseg, dim, n)[:, :, 0].contiguous()

    def empty():
        return u.new_empty((0,))  # a fresh one each time: custom-op outputs may not alias

    if u.dim() == 3:
        du = du.sum(0).to(u.dtype)
    if z is not None and z.dim() == 3:
        dz = dz.sum(0).to(z.dtype)
    return [
        du, ddt, dA.sum(1).to(A.dtype), dB.sum(0).to(B.dtype), dC.sum(0).to(C.dtype),
        dD.sum(1).to(D.dtype) if D is not None else empty(),
        dz if z is not None else empty(),
        ddtb.sum(1).to(delta_bias.dtype) if delta_bias is not None else empty(),
        dh0,
    ]


@_scan_bwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, flags, cu_seqlens, hsave, dout, dlast, H, W, delta_softplus, block_t,
      block_d, deterministic, negative_eigenvalues=False):
    K, batch, L, dim, G, dpg, nseq, nchunk, nslots = _geometry(u, A, B, C, cu_seqlens, block_t)
    return [
        torch.empty_like(u, memory_format=torch.contiguous_format),
        torch.empty_like(delta, memory_format=torch.contiguous_format),
        A.new_empty(A.shape), B.new_empty(B.shape), C.new_empty(C.shape),
        D.new_empty(D.shape) if D is not None else u.new_empty((0,)),
        z.new_empty(z.shape) if z is not None else u.new_empty((0,)),
        delta_bias.new_empty(delta_bias.shape) if delta_bias is not None else u.new_empty((0,)),
        u.new_empty((K, nseq, dim, A.shape[2]), dtype=torch.float32),
    ]


def _setup_context(ctx, inputs, output):
    (u, delta, A, B, C, D, z, delta_bias, initial_state, flags, cu_seqlens, H, W, delta_softplus, save_states,
     block_t, block_d, negative_eigenvalues) = inputs
    if not save_states:
        raise RuntimeError("selective_scan: backward through a call made without save_states")
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, flags, cu_seqlens, output[2])
    ctx.meta = (H, W, delta_softplus, block_t, block_d, None if initial_state is None else initial_state.dtype,
                negative_eigenvalues)


def _backward(ctx, dout, dlast, _dhsave):
    u, delta, A, B, C, D, z, delta_bias, flags, cu_seqlens, hsave = ctx.saved_tensors
    H, W, softplus, block_t, block_d, h0_dtype, negative_eigenvalues = ctx.meta
    if dout is None:
        dout = torch.zeros((A.shape[0], *u.shape[-3:]), dtype=u.dtype, device=u.device)
    du, ddt, dA, dB, dC, dD, dz, ddtb, dh0 = _scan_bwd(
        u, delta, A, B, C, D, z, delta_bias, flags, cu_seqlens, hsave, dout, dlast, H, W, softplus, block_t,
        block_d, torch.are_deterministic_algorithms_enabled(), negative_eigenvalues,
    )
    return (
        du, ddt, dA, dB, dC,
        dD if D is not None else None, dz if z is not None else None, ddtb if delta_bias is not None else None,
        dh0.to(h0_dtype) if h0_dtype is not None else None,
        None, None, None, None, None, None, None, None, None,
    )


_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


def _flags_tensor(flags: tuple, device: torch.device) -> torch.Tensor:
    """The per-direction flags as a device tensor. Copying a host list to the GPU synchronises the
    stream (the host then waits for all queued work), so eager calls reuse one tensor per value."""
    if torch.compiler.is_compiling():
        return torch.tensor(flags, dtype=torch.int32, device=device)
    return _cached_flags(flags, device)


@functools.lru_cache(maxsize=64)
def _cached_flags(flags: tuple, device: torch.device) -> torch.Tensor:
    # A tensor made under inference_mode could not be saved for a later backward.
    with torch.inference_mode(False):
        return torch.tensor(flags, dtype=torch.int32, device=device)


_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"  # read once: Triton itself reads it at import


def _check_device(u: torch.Tensor):
    if u.device.type != "cuda" and not _INTERPRETER:
        raise ValueError(
            f"selective_scan_triton: expected CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter), "
            f"got tensors on {u.device}"
        )


def _needs_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def _groups(BC: torch.Tensor, K: Optional[int]) -> torch.Tensor:
    """(.., b, l, n) -> (.., b, l, 1, n) view; grouped layouts unchanged."""
    return BC.unsqueeze(-2) if BC.dim() == (3 if K is None else 4) else BC


def selective_scan_triton(
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
    block_t: Optional[int] = None,
    block_d: Optional[int] = None,
    negative_eigenvalues: bool = False,
):
    """Same contract as ``zoo.core.selective_scan.selective_scan_naive`` (channels-last, any
    strides, ``negative_eigenvalues`` included), plus ``cu_seqlens`` for packed sequences.
    ``block_t``/``block_d`` override the tile sizes (benchmarks). Inputs are assumed validated by
    the core op."""
    _check_device(u)
    flags = _flags_tensor((REVERSE if reverse else 0,), u.device)
    out, last = _run(
        u[None], delta[None], A[None], _groups(B, None)[None], _groups(C, None)[None],
        None if D is None else D[None], None if z is None else z[None],
        None if delta_bias is None else delta_bias[None],
        None if initial_state is None else initial_state[None], flags, cu_seqlens, 1, 1, delta_softplus,
        block_t, block_d, negative_eigenvalues,
    )
    return (out[0], last[0]) if return_last_state else out[0]


def _run(u, delta, A, B, C, D, z, delta_bias, h0, flags, cu_seqlens, H, W, softplus, block_t, block_d,
         negative_eigenvalues=False):
    dpg = u.shape[-1] // _lcm(B.shape[3], C.shape[3])
    bt = _config(A.shape[2], dpg, False, block_t, block_d)[0]
    save = _needs_grad(u, delta, A, B, C, D, z, delta_bias, h0)
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(torch.int64)
    out, last, _ = _scan_fwd(
        u, delta, A, B, C, D, z, delta_bias, h0, flags, cu_seqlens, H, W, delta_softplus=softplus,
        save_states=save, block_t=bt, block_d=block_d or 0, negative_eigenvalues=negative_eigenvalues,
    )
    return out, last


def selective_scan_multi_triton(
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
    directions: Sequence[str] = ("forward", "reverse"),
    hw: Optional[tuple[int, int]] = None,
    initial_state: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    block_t: Optional[int] = None,
    block_d: Optional[int] = None,
    negative_eigenvalues: bool = False,
):
    """K scans in one launch; see ``zoo.core.selective_scan.selective_scan_multi`` for the
    contract. Inputs with a leading K axis are per direction; without it they are shared."""
    _check_device(u)
    K = len(directions)
    flag_list = [direction_flags(d, hw) for d in directions]
    flags = _flags_tensor(tuple(flag_list), u.device)

    H, W = hw if any(f & TRANSPOSE for f in flag_list) else (1, 1)
    out, last = _run(
        u, delta, A, _groups(B, K), _groups(C, K), D, z, delta_bias, initial_state, flags, cu_seqlens, H, W, delta_softplus,
        block_t, block_d, negative_eigenvalues,
    )
    return (out, last) if return_last_state else out


def direction_flags(name: str, hw: Optional[tuple[int, int]]) -> int:
    """'forward' | 'reverse' over the sequence; 'forward_t' | 'reverse_t' over an H x W image
    read column-major (needs ``hw``)."""
    table = {"forward": 0, "reverse": REVERSE, "forward_t": TRANSPOSE, "reverse_t": TRANSPOSE | REVERSE}
    if name not in table:
        raise ValueError(f"selective_scan: unknown direction {name!r}; expected one of {sorted(table)}")
    if table[name] & TRANSPOSE and hw is None:
        raise ValueError(f"selective_scan: direction {name!r} needs hw=(H, W)")
    return table[name]
