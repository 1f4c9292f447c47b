"""The SSD scan op (Mamba-2's scan): argument checks, dt transform, packed sequences, dispatch; and the
one-step update used for decoding.

``impl`` picks the path: "auto" (the Triton SSD kernels on CUDA for half, bfloat16 and float32 inputs; on the
CPU the fused numba scan when numba is installed (the ``cpu`` extra), else the chunked PyTorch form, which is also
what ``torch.compile`` traces), "triton", "cpu" (the fused numba scan), "chunked", "naive" (the sequential oracle),
or "selective": the SSD
scan is the Mamba-1 selective scan with A, dt and D shared by the headdim channels of a head, so it runs
through ``zoo.core.selective_scan`` (mamba-ssm's ``ssd_selective_scan`` makes the same reduction).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..packing import Packing
from ..precision import compute_dtype, upcast
from ..selective_scan import selective_scan
from ..selective_scan.step import selective_state_update
from ._checks import check_ssd_args, prepare_dt
from . import cpu_fused
from .chunked import ssd_scan_chunked
from .cpu_fused import ssd_scan_cpu
from .naive import ssd_scan_naive

IMPLS = ("auto", "triton", "cpu", "chunked", "naive", "selective")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
NO_LIMIT = (0.0, float("inf"))


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None,
    dt_softplus: bool = False,
    dt_limit: Sequence[float] = NO_LIMIT,
    initial_state: Optional[torch.Tensor] = None,
    return_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    reverse: bool = False,
    chunk_size: int = 64,
    impl: str = "auto",
    negative_eigenvalues: bool = False,
):
    """SSD scan (mamba-ssm's ``mamba_chunk_scan_combined`` semantics) in its (batch, length, heads, headdim) layout.

    Per batch b, head h (``reverse`` runs t from the end to the start)::

        dt_t  = clamp(softplus(dt_t + dt_bias[h]), *dt_limit)   (softplus only when dt_softplus)
        S_t   = exp(dt_t * A[h]) * S_{t-1} + dt_t * x_t B_t^T     (S: headdim x d_state)
        y_t   = S_t C_t + D * x_t
        out_t = y_t * silu(z_t)                                  (when z is given)

    Args:
        x, z: (batch, length, nheads, headdim).
        dt: (batch, length, nheads).
        A: (nheads,), one scalar decay per head (negative for a stable scan).
        B, C: (batch, length, ngroups, d_state); head h reads group h // (nheads // ngroups).
        D: (nheads,) or (nheads, headdim). dt_bias: (nheads,).
        initial_state: (batch, nheads, headdim, d_state), or (num_seqs, ...) with ``cu_seqlens``.
        cu_seqlens: [0, l1, l1+l2, ..., length] for packed sequences (batch 1); the state restarts at
            every boundary and final states are per sequence.
        chunk_size: steps per chunk of the chunked form (a speed setting; results do not depend on it).
        negative_eigenvalues: the transition 2 * exp(dt_t * A) - 1 in (-1, 1) instead of exp(dt_t * A)
            (Grazzi et al., ICLR 2025), which lets a head flip the sign of its state (parity, modular counting).

    Returns ``out`` in x's dtype, or ``(out, final_state)`` with the state in float32 (float64 for float64
    inputs), (batch or num_seqs, nheads, headdim, d_state).
    """
    check_ssd_args(x, dt, A, B, C, D, z, dt_bias, dt_limit, initial_state, cu_seqlens, chunk_size)
    if impl not in IMPLS:
        raise ValueError(f"ssd_scan: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = _auto(x)
    if impl == "cpu" and x.device.type != "cpu":
        raise ValueError(f"ssd_scan: impl='cpu' takes CPU tensors, got {x.device.type} tensors")
    if impl == "triton" and (x.dtype not in _TRITON_DTYPES or not (x.is_cuda or _interpreting())):
        raise ValueError(f"ssd_scan: impl='triton' needs CUDA tensors of dtype float16, bfloat16 or float32, got "
                         f"{x.dtype} on {x.device}")
    step = prepare_dt(dt, dt_bias, dt_softplus, dt_limit)
    if impl == "selective":
        out, final = _via_selective_scan(x, step, A, B, C, D, z, initial_state, cu_seqlens, reverse, negative_eigenvalues)
    elif impl == "cpu":  # packed sequences natively, no padding
        out, final = ssd_scan_cpu(x, step, A, B, C, D, z, initial_state=initial_state, reverse=reverse,
                                  negative_eigenvalues=negative_eigenvalues, cu_seqlens=cu_seqlens)
    else:
        if impl == "triton":
            from ...kernels.ssd import ssd_scan_triton as fn
        elif impl == "naive":
            fn = ssd_scan_naive
        else:
            fn = lambda *a, **k: ssd_scan_chunked(*a, chunk_size=chunk_size, **k)  # noqa: E731
        kw = dict(reverse=reverse, negative_eigenvalues=negative_eigenvalues)
        if cu_seqlens is None:
            out, final = fn(x, step, A, B, C, D, z, initial_state=initial_state, **kw)
        else:  # padded steps have dt = 0: transition 1 (either kind) and no input, in either direction
            packing = Packing(cu_seqlens, x.shape[1], x.device)
            pad = packing.pad
            out, final = fn(pad(x), pad(step), A, pad(B), pad(C), D, None if z is None else pad(z),
                            initial_state=initial_state, **kw)
            out = packing.unpad(out)
    return (out, final) if return_final_state else out


def _auto(x: torch.Tensor) -> str:
    if x.is_cuda and x.dtype in _TRITON_DTYPES:
        return "triton"
    # torch.compile traces the chunked form: dynamo cannot see into the numba kernels.
    if x.device.type == "cpu" and cpu_fused.available() and not torch.compiler.is_compiling():
        return "cpu"
    return "chunked"


def _interpreting() -> bool:
    """Triton's interpreter runs the kernels on CPU tensors (the kernel tests without a GPU)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _via_selective_scan(x, step, A, B, C, D, z, initial_state, cu_seqlens, reverse, negative_eigenvalues=False):
    """The SSD scan as a selective scan over nheads * headdim channels (A, dt and D repeated per head)."""
    b, length, nheads, headdim = x.shape
    d_state = B.shape[-1]
    channels = nheads * headdim
    acc = compute_dtype(x.dtype)
    per_channel = lambda t: t.to(acc)[:, None].expand(nheads, headdim).reshape(channels)  # noqa: E731
    A1 = A.to(acc)[:, None, None].expand(nheads, headdim, d_state).reshape(channels, d_state)
    D1 = None if D is None else (per_channel(D) if D.dim() == 1 else D.to(acc).reshape(channels))
    out, final = selective_scan(
        x.reshape(b, length, channels), step[..., None].expand(b, length, nheads, headdim).reshape(b, length, channels),
        A1, B, C, D=D1, z=None if z is None else z.reshape(b, length, channels), return_last_state=True,
        reverse=reverse, cu_seqlens=cu_seqlens, negative_eigenvalues=negative_eigenvalues,
        initial_state=None if initial_state is None else initial_state.reshape(-1, channels, d_state),
    )
    return out.reshape(b, length, nheads, headdim), final.reshape(-1, nheads, headdim, d_state)


def ssd_step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None,
    dt_softplus: bool = False,
    dt_limit: Sequence[float] = NO_LIMIT,
    negative_eigenvalues: bool = False,
    inplace: bool = False,
):
    """One decoding step of :func:`ssd_scan` (mamba-ssm's ``selective_state_update`` for Mamba-2).

    Shapes: state (batch, nheads, headdim, d_state); x, z (batch, nheads, headdim); dt (batch, nheads);
    B, C (batch, ngroups, d_state). Returns ``(out, new_state)``: out in x's dtype, the state in the
    state's dtype (float32 or float64 keep the precision of ``ssd_scan``'s final state); ``inplace`` writes the new
    state over ``state`` and returns it.
    """
    if x.dim() != 3 or state.dim() != 4 or state.shape[:3] != x.shape or B.dim() != 3:
        raise ValueError(
            "ssd_step: expected state (batch, nheads, headdim, d_state), x (batch, nheads, headdim), "
            f"B and C (batch, ngroups, d_state); got state {tuple(state.shape)}, x {tuple(x.shape)}, B {tuple(B.shape)}"
        )
    check_ssd_args(x[:, None], dt[:, None], A, B[:, None], C[:, None], D, None if z is None else z[:, None],
                   dt_bias, dt_limit, state, None, 1, op="ssd_step")
    # The selective state update with A, dt and D broadcast over each head's channels (one Triton kernel on CUDA).
    b, nheads, headdim = x.shape
    d_state = state.shape[-1]
    step = prepare_dt(dt, dt_bias, dt_softplus, dt_limit)[..., None].expand(b, nheads, headdim)
    D = None if D is None else (D[:, None].expand(nheads, headdim) if D.dim() == 1 else D)
    A = upcast(A)[:, None, None].expand(nheads, headdim, d_state)
    return selective_state_update(state, x, step, A, B, C, D=D, z=z, negative_eigenvalues=negative_eigenvalues,
                                  inplace=inplace)
