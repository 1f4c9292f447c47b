"""Chunked SSD on PyTorch: the state-space-duality form of Mamba-2 (Dao & Gu, 2024), the CPU path.

The sequence is cut into chunks of Q steps. Within a chunk the scan is a masked matrix product
(y_i = sum_{j <= i} (C_i . B_j) exp(cs_i - cs_j) dt_j x_j, cs the cumulative sum of dt A), which runs as
batched matmuls; across chunks only the (headdim, d_state) states are carried, one small step per chunk:

1. every chunk's state from a zero start: S_c = sum_j exp(cs_last - cs_j) dt_j x_j B_j^T,
2. the true state entering each chunk: H_{c+1} = exp(cs_last_c) H_c + S_c,
3. the output: the intra-chunk product plus exp(cs_i) C_i . H_c.

Padding to a whole number of chunks uses dt = 0 (decay 1, no input), which changes neither the outputs
nor the final state. Gradients come from autograd.

With negative eigenvalues the transition a = 2 exp(dt A) - 1 can be negative, so the products of
transitions are taken as exp(cumsum log|a|) times the sign (-1)^(number of negative factors), |a| kept at
least the dtype's smallest normal number so that logarithms stay finite.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..precision import compute_dtype
from ..selective_scan.transition import decay
from ._checks import heads_of_groups, skip_term


def _signed_exp(log_magnitude: torch.Tensor, negatives: Optional[torch.Tensor]) -> torch.Tensor:
    """exp(log_magnitude), negated where the count of negative factors is odd (None: all positive)."""
    value = torch.exp(log_magnitude)
    return value if negatives is None else value * (1 - 2 * (negatives % 2)).to(value.dtype)


def ssd_scan_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    initial_state: Optional[torch.Tensor] = None,
    reverse: bool = False,
    chunk_size: int = 64,
    negative_eigenvalues: bool = False,
):
    """Same contract as :func:`ssd_scan_naive`."""
    if reverse:  # the reverse scan is the forward scan of the time-flipped sequence
        flip = lambda t: None if t is None else t.flip(1)  # noqa: E731
        y, last = ssd_scan_chunked(flip(x), flip(dt), A, flip(B), flip(C), D, flip(z), initial_state, False, chunk_size,
                                   negative_eigenvalues)
        return y.flip(1), last
    acc = compute_dtype(x.dtype)
    b, length, nheads, headdim = x.shape
    d_state = B.shape[-1]
    Q = max(1, min(chunk_size, length))
    nc = -(-length // Q) if length else 0
    pad = nc * Q - length
    xa, dta = x.to(acc), dt.to(acc)
    Bh, Ch = heads_of_groups(B.to(acc), nheads), heads_of_groups(C.to(acc), nheads)
    if pad:
        xa, dta, Bh, Ch = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (xa, dta, Bh, Ch))
    # (b, nc, Q, h, ...) -> heads before the time axis: (b, nc, h, Q, ...)
    xc = xa.reshape(b, nc, Q, nheads, headdim).transpose(2, 3)
    Bc = Bh.reshape(b, nc, Q, nheads, d_state).transpose(2, 3)
    Cc = Ch.reshape(b, nc, Q, nheads, d_state).transpose(2, 3)
    dtc = dta.reshape(b, nc, Q, nheads).transpose(2, 3)  # (b, nc, h, Q)
    dtA = dtc * A.to(acc)[:, None]  # (b, nc, h, Q)
    if negative_eigenvalues:
        a = decay(dtA, True)
        cs = torch.cumsum(torch.log(a.abs().clamp(min=torch.finfo(acc).tiny)), dim=-1)
        odd = torch.cumsum((a < 0).to(torch.int64), dim=-1)  # negative factors up to each step
    else:
        cs, odd = torch.cumsum(dtA, dim=-1), None

    dx = dtc[..., None] * xc  # (b, nc, h, Q, p)

    # 1. intra-chunk: masked decay matrix times (C B^T).
    causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    seg = (cs[..., :, None] - cs[..., None, :]).masked_fill(~causal, float("-inf"))  # masked before exp: no inf
    seg = _signed_exp(seg, None if odd is None else odd[..., :, None] - odd[..., None, :])
    scores = (Cc @ Bc.transpose(-1, -2)) * seg  # (b, nc, h, Q, Q)
    y = scores @ dx  # (b, nc, h, Q, p)

    # 2. each chunk's state from zero, and the carried states.
    to_end = _signed_exp(cs[..., -1:] - cs, None if odd is None else odd[..., -1:] - odd)  # (b, nc, h, Q)
    chunk_states = (dx * to_end[..., None]).transpose(-1, -2) @ Bc  # (b, nc, h, p, n)
    chunk_decay = _signed_exp(cs[..., -1], None if odd is None else odd[..., -1])  # (b, nc, h)
    state = xa.new_zeros(b, nheads, headdim, d_state) if initial_state is None else initial_state.to(acc)
    entering = []
    for c in range(nc):
        entering.append(state)
        state = chunk_decay[:, c, :, None, None] * state + chunk_states[:, c]
    if nc:
        H = torch.stack(entering, dim=1)  # (b, nc, h, p, n)
        # 3. the carried state read out at every step of the chunk.
        y = y + _signed_exp(cs, odd)[..., None] * (Cc @ H.transpose(-1, -2))
    y = y.transpose(2, 3).reshape(b, nc * Q, nheads, headdim)[:, :length]
    skip = skip_term(D, xa[:, :length])
    if skip is not None:
        y = y + skip
    if z is not None:
        y = y * F.silu(z.to(acc))
    return y.to(x.dtype), state
