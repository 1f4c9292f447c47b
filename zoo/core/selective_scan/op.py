"""The selective-scan op: argument checks, packed sequences, and dispatch to an implementation.

``impl`` picks the path: "auto" (Triton kernels for CUDA tensors when available, else the chunked
PyTorch path), "chunked", "naive" (the sequential oracle), or "triton".
"""
from __future__ import annotations

from typing import Optional

import torch

from ._checks import check_scan_args
from .chunked import selective_scan_chunked
from .naive import selective_scan_naive

IMPLS = ("auto", "chunked", "naive", "triton")


def _triton_scan():
    # Imported lazily: zoo.kernels needs triton and a GPU, the CPU path needs neither.
    from zoo.kernels.selective_scan import selective_scan_triton

    return selective_scan_triton


def _resolve(impl: str, device: torch.device):
    if impl not in IMPLS:
        raise ValueError(f"selective_scan: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        if device.type == "cuda":
            try:
                return _triton_scan()
            except ImportError:
                return selective_scan_chunked
        return selective_scan_chunked
    if impl == "triton":
        return _triton_scan()
    return selective_scan_chunked if impl == "chunked" else selective_scan_naive


def selective_scan(
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
    impl: str = "auto",
):
    """Selective scan in channels-last layout.

    Per batch b, channel d, state n (``reverse`` runs t from the end to the start)::

        dt_t  = softplus(delta_t + delta_bias)        (softplus only when delta_softplus)
        h_t   = exp(dt_t * A[d, n]) * h_{t-1} + dt_t * B_t[n] * u_t
        y_t   = sum_n C_t[n] * h_t[n] + D[d] * u_t
        out_t = y_t * silu(z_t)                       (when z is given)

    Args:
        u, delta: (batch, length, dim).
        A: (dim, d_state), real.
        B, C: (batch, length, d_state), shared by all channels, or (batch, length, groups, d_state)
            where channel d reads group d // (dim // groups).
        D, delta_bias: (dim,) or None.
        z: (batch, length, dim) gate or None.
        initial_state: (batch, dim, d_state) state before the first step (before the last one
            with ``reverse``); (num_seqs, dim, d_state) with ``cu_seqlens``.
        cu_seqlens: int tensor [0, l1, l1+l2, ..., length] for packed sequences (batch must be 1);
            the state restarts at every boundary.
        return_last_state: also return the float32 state after the final step, (batch or
            num_seqs, dim, d_state).

    Returns ``out`` in u's dtype (state and accumulation are float32, float64 for float64
    inputs), or ``(out, last_state)``.
    """
    check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens)
    fn = _resolve(impl, u.device)
    kwargs = dict(D=D, delta_bias=delta_bias, delta_softplus=delta_softplus, reverse=reverse)
    torch_path = fn in (selective_scan_chunked, selective_scan_naive)
    if cu_seqlens is None or not torch_path:
        if cu_seqlens is not None:
            kwargs["cu_seqlens"] = cu_seqlens  # the kernels handle packed sequences natively
        return fn(u, delta, A, B, C, z=z, return_last_state=return_last_state, initial_state=initial_state, **kwargs)
    # PyTorch paths: one call per packed sequence.
    outs, lasts = [], []
    bounds = cu_seqlens.tolist()
    for i, (s, e) in enumerate(zip(bounds, bounds[1:])):
        h0 = None if initial_state is None else initial_state[i : i + 1]
        piece = lambda t: None if t is None else t[:, s:e]  # noqa: E731
        out, last = fn(
            u[:, s:e], delta[:, s:e], A, B[:, s:e], C[:, s:e], z=piece(z),
            return_last_state=True, initial_state=h0, **kwargs,
        )
        outs.append(out)
        lasts.append(last)
    out = torch.cat(outs, dim=1)
    return (out, torch.cat(lasts, dim=0)) if return_last_state else out


def selective_scan_fn(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False
):
    """mamba-ssm's ``selective_scan_fn`` signature and layout: u, delta, z (batch, dim, length);
    B, C (batch, d_state, length) or (batch, groups, d_state, length). Same semantics."""
    if u.dim() != 3:
        raise ValueError(f"selective_scan_fn: u must be (batch, dim, length), got shape {tuple(u.shape)}")
    for name, t in (("B", B), ("C", C)):
        if t.dim() not in (3, 4):
            raise ValueError(
                f"selective_scan_fn: {name} must be (batch, d_state, length) or (batch, groups, d_state, length), "
                f"got shape {tuple(t.shape)}"
            )

    def to_last(t):
        if t is None:
            return None
        return t.transpose(1, 2) if t.dim() == 3 else t.permute(0, 3, 1, 2)

    out = selective_scan(
        to_last(u), to_last(delta), A, to_last(B), to_last(C), D=D, z=to_last(z), delta_bias=delta_bias,
        delta_softplus=delta_softplus, return_last_state=return_last_state,
    )
    if return_last_state:
        return out[0].transpose(1, 2), out[1]
    return out.transpose(1, 2)
