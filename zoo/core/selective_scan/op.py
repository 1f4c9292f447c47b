"""The selective-scan op: argument checks, packed sequences, and dispatch to an implementation.

``impl`` picks the path: "auto" (Triton kernels for CUDA tensors when available; on the CPU the fused numba
scan when numba is installed, else the chunked PyTorch path), "cpu" (the fused numba scan), "chunked",
"naive" (the sequential oracle), or "triton".
"""
from __future__ import annotations

from typing import Optional

import torch

from ..packing import Packing
from ..precision import upcast
from ._checks import check_scan_args
from . import cpu_fused
from .chunked import selective_scan_chunked
from .cpu_fused import selective_scan_cpu
from .naive import selective_scan_naive

IMPLS = ("auto", "chunked", "naive", "triton", "cpu")


def _triton_scan():
    # Imported lazily: zoo.kernels needs triton and a GPU, the CPU path needs neither.
    from zoo.kernels.selective_scan import selective_scan_triton

    return selective_scan_triton


def _resolve(impl: str, device: torch.device, negative_eigenvalues: bool = False):
    # Every path takes negative_eigenvalues (the Triton kernels through their SIGNED variant), so it
    # does not change the choice; the argument stays for callers that pass it.
    if impl not in IMPLS:
        raise ValueError(f"selective_scan: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        if device.type == "cuda":
            try:
                return _triton_scan()
            except ImportError:
                return selective_scan_chunked
        # torch.compile traces the chunked path: dynamo cannot see into the numba kernels.
        if device.type == "cpu" and cpu_fused.available() and not torch.compiler.is_compiling():
            return selective_scan_cpu
        return selective_scan_chunked
    if impl == "triton":
        return _triton_scan()
    if impl == "cpu":
        if device.type != "cpu":
            raise ValueError(f"selective_scan: impl='cpu' takes CPU tensors, got {device.type} tensors")
        return selective_scan_cpu
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
    negative_eigenvalues: bool = False,
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
        negative_eigenvalues: the transition 2 * exp(dt_t * A) - 1 in (-1, 1) instead of exp(dt_t * A)
            (Grazzi et al., ICLR 2025); every path takes it, the Triton kernels included.

    Returns ``out`` in u's dtype (state and accumulation are float32, float64 for float64
    inputs), or ``(out, last_state)``.
    """
    check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens)
    fn = _resolve(impl, u.device, negative_eigenvalues)
    kwargs = dict(D=D, delta_bias=delta_bias, delta_softplus=delta_softplus, reverse=reverse)
    if negative_eigenvalues:
        kwargs["negative_eigenvalues"] = True
    torch_path = fn in (selective_scan_chunked, selective_scan_naive)
    if cu_seqlens is None or not torch_path:
        if cu_seqlens is not None:
            kwargs["cu_seqlens"] = cu_seqlens  # the kernels and the fused CPU scan handle packed sequences natively
        return fn(u, delta, A, B, C, z=z, return_last_state=return_last_state, initial_state=initial_state, **kwargs)
    return _packed_torch_scan(fn, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, reverse,
                              initial_state, cu_seqlens, negative_eigenvalues)


def _packed_torch_scan(fn, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, reverse,
                       initial_state, cu_seqlens, negative_eigenvalues=False):
    """PyTorch paths for packed sequences: one batched scan over the sequences padded to the
    longest. Padded steps get dt = 0 (decay exp(0) = 1, input 0), so they leave the state as it
    was in either direction, and the final state is the state after each sequence's own last step."""
    packing = Packing(cu_seqlens, u.shape[1], u.device)
    pad = packing.pad
    dt = upcast(delta)
    if delta_bias is not None:
        dt = dt + delta_bias.to(dt.dtype)
    if delta_softplus:
        dt = torch.nn.functional.softplus(dt)
    out = fn(pad(u), pad(dt), A, pad(B), pad(C), D=D, z=None if z is None else pad(z), delta_bias=None,
             delta_softplus=False, reverse=reverse, return_last_state=True, initial_state=initial_state,
             negative_eigenvalues=negative_eigenvalues)
    y = packing.unpad(out[0])
    return (y, out[1]) if return_last_state else y


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


DIRECTIONS = ("forward", "reverse", "forward_t", "reverse_t")


def _scan_order(name: str, length: int, hw, device) -> torch.Tensor:
    """Token positions in visiting order, before any reversal (the scan itself reverses)."""
    order = torch.arange(length, device=device)
    if name.endswith("_t"):
        H, W = hw
        order = order.view(H, W).t().reshape(-1)
    return order


def selective_scan_multi(
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
    directions=("forward", "reverse"),
    hw: Optional[tuple] = None,
    initial_state: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    impl: str = "auto",
    negative_eigenvalues: bool = False,
):
    """K = len(directions) scans over the same sequences, in one kernel launch on the GPU.

    Directions: "forward", "reverse" (Vim's pair), and for an H x W image (``hw``, H * W = length,
    row-major tokens) "forward_t" / "reverse_t", which visit the tokens column-major (VMamba's
    cross-scan). Every per-token tensor is in the original token order, outputs too: no flipped or
    transposed copies; the caller sums ``out`` over K to merge.

    Shapes: u, z (batch, length, dim) shared by all directions, or (K, batch, length, dim);
    delta (K, batch, length, dim); A (K, dim, d_state); B, C (K, batch, length, d_state) or
    (K, batch, length, groups, d_state); D, delta_bias (K, dim); initial_state (K, batch or
    num_seqs, dim, d_state). Returns out (K, batch, length, dim) and optionally the final states
    (K, batch or num_seqs, dim, d_state).
    """
    K = len(directions)
    for name in directions:
        if name not in DIRECTIONS:
            raise ValueError(f"selective_scan_multi: unknown direction {name!r}; expected one of {DIRECTIONS}")
    if delta.dim() != 4 or delta.shape[0] != K:
        raise ValueError(
            f"selective_scan_multi: delta must be (K={K}, batch, length, dim), got shape {tuple(delta.shape)}"
        )
    length = delta.shape[2]
    if any(n.endswith("_t") for n in directions):
        if hw is None or hw[0] * hw[1] != length or cu_seqlens is not None:
            raise ValueError(
                f"selective_scan_multi: column-major directions need hw=(H, W) with H*W = length {length} "
                f"and no cu_seqlens, got hw={hw}, cu_seqlens={'set' if cu_seqlens is not None else None}"
            )
    for name, t, per in (("A", A, 3), ("D", D, 2), ("delta_bias", delta_bias, 2), ("initial_state", initial_state, 4)):
        if t is not None and (t.dim() != per or t.shape[0] != K):
            raise ValueError(
                f"selective_scan_multi: {name} needs a leading direction axis of size K={K}, got shape {tuple(t.shape)}"
            )
    if B.shape[0] != K or C.shape[0] != K:
        raise ValueError(f"selective_scan_multi: B and C need a leading direction axis of size K={K}, "
                         f"got {tuple(B.shape)} and {tuple(C.shape)}")

    for k in range(K):
        check_scan_args(u[k] if u.dim() == 4 else u, delta[k], A[k], B[k], C[k], None if D is None else D[k],
                        None if z is None else (z[k] if z.dim() == 4 else z),
                        None if delta_bias is None else delta_bias[k],
                        None if initial_state is None else initial_state[k], cu_seqlens)
    fn = _resolve(impl, u.device, negative_eigenvalues)
    if fn not in (selective_scan_chunked, selective_scan_naive, selective_scan_cpu):
        from zoo.kernels.selective_scan import selective_scan_multi_triton

        return selective_scan_multi_triton(
            u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
            return_last_state=return_last_state, directions=directions, hw=hw, initial_state=initial_state,
            cu_seqlens=cu_seqlens, negative_eigenvalues=negative_eigenvalues,
        )
    # PyTorch paths: one scan per direction on gathered tokens, scattered back.
    outs, lasts = [], []
    for k, name in enumerate(directions):
        order = _scan_order(name, length, hw, u.device)
        gather = lambda t: None if t is None else t.index_select(1, order)  # noqa: E731
        uk = u[k] if u.dim() == 4 else u
        zk = None if z is None else (z[k] if z.dim() == 4 else z)
        out, last = selective_scan(
            gather(uk), gather(delta[k]), A[k], gather(B[k]), gather(C[k]), D=None if D is None else D[k],
            z=gather(zk), delta_bias=None if delta_bias is None else delta_bias[k], delta_softplus=delta_softplus,
            return_last_state=True, reverse=name.startswith("reverse"),
            initial_state=None if initial_state is None else initial_state[k], cu_seqlens=cu_seqlens, impl=impl,
            negative_eigenvalues=negative_eigenvalues,
        )
        outs.append(torch.empty_like(out).index_copy(1, order, out))
        lasts.append(last)
    out = torch.stack(outs)
    return (out, torch.stack(lasts)) if return_last_state else out
