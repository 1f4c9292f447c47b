"""Hydra (Hwang et al., "Hydra: Bidirectional State Space Models Through Generalized Matrix Mixers", 2024):
the quasiseparable bidirectional mixer built on the SSD scan.

Semantics and parameter names of goombalab/hydra ``hydra/modules/hydra.py`` (its unfused path):
in_proj -> [z, xBC, dt (2 * nheads)]; a non-causal depthwise conv (kernel ``d_conv``, zero padding
``d_conv // 2`` on both sides) + SiLU over xBC = [x, B_fw, C_fw, B_bw, C_bw]; a forward SSD scan with
(dt_fw, B_fw, C_fw) and a backward one with (dt_bw, B_bw, C_bw), both with A = -exp(A_log) and without D;
each output shifted by one step away from its own token (forward: y_t reads the scan at t - 1, backward at
t + 1, zero at the ends), so that the diagonal is left to the data-dependent term
x * (fc_D(x) + D) per head; the sum is normed with the gated RMSNorm (norm, then * silu(z)) and projected.

Here the backward scan is a reverse scan over the sequence in place (no flipped copies), which equals the
official flip -> scan -> flip.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .checks import check_sizes
from .mamba2 import _dt_bias
from .norm import RMSNormGated
from .packing import Packing
from .precision import upcast
from .ssd import ssd_scan


class Hydra(nn.Module):
    """The Hydra mixer: (batch, length, d_model) -> same, every token sees the whole sequence.
    ``negative_eigenvalues``: transitions 2 exp(dt A) - 1 in (-1, 1) in both scans (Grazzi et al.)."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        d_conv: int = 7,
        conv_init: Optional[float] = None,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_limit: Sequence[float] = (0.0, float("inf")),
        learnable_init_states: bool = False,
        bias: bool = False,
        conv_bias: bool = True,
        chunk_size: int = 256,
        layer_idx: Optional[int] = None,
        negative_eigenvalues: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        name = type(self).__name__
        check_sizes(name, d_model=d_model, d_state=d_state, d_conv=d_conv, headdim=headdim, ngroups=ngroups,
                    chunk_size=chunk_size)
        if d_conv % 2 == 0:
            raise ValueError(f"{name}: d_conv must be odd (the conv is centred, padding d_conv // 2), got {d_conv}")
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        if self.d_inner % headdim:
            raise ValueError(f"{name}: headdim={headdim} must divide d_inner={self.d_inner}")
        self.headdim, self.nheads = headdim, self.d_inner // headdim
        if self.nheads % ngroups:
            raise ValueError(f"{name}: ngroups={ngroups} must divide the number of heads {self.nheads}")
        self.ngroups, self.dt_limit, self.chunk_size = ngroups, tuple(dt_limit), chunk_size
        self.learnable_init_states, self.layer_idx = learnable_init_states, layer_idx
        self.negative_eigenvalues = negative_eigenvalues

        gn = ngroups * d_state
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 4 * gn + 2 * self.nheads, bias=bias, **factory)
        self.conv_dim = self.d_inner + 4 * gn
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv // 2,
                                bias=conv_bias, **factory)
        if conv_init is not None:
            nn.init.uniform_(self.conv1d.weight, -conv_init, conv_init)
        if learnable_init_states:
            self.init_states = nn.Parameter(torch.zeros(self.nheads, headdim, d_state, **factory))
            self.init_states._no_weight_decay = True
        self.dt_bias = _dt_bias(self.nheads, dt_min, dt_max, dt_init_floor, device)
        self.A_log = nn.Parameter(torch.zeros(self.nheads, dtype=torch.float32, device=device))  # A = -1
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.nheads, device=device))
        self.D._no_weight_decay = True
        self.fc_D = nn.Linear(self.d_inner, self.nheads, bias=False, **factory)
        self.norm = RMSNormGated(self.d_inner, eps=1e-5, norm_before_gate=True, **factory)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

    def forward(self, hidden: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(batch, length, d_model) -> same. ``cu_seqlens``: packed sequences in batch 1, kept apart (each
        sequence is run zero-padded, as alone: the conv sees zeros past its ends, padded steps have dt = 0)."""
        if hidden.dim() != 3 or hidden.shape[-1] != self.d_model:
            raise ValueError(f"{type(self).__name__}: expected input of shape (batch, length, {self.d_model}), "
                             f"got {tuple(hidden.shape)}")
        if cu_seqlens is None:
            return self._forward(hidden, None)
        if hidden.shape[0] != 1:
            raise ValueError(f"{type(self).__name__}: packed sequences (cu_seqlens) need batch 1, got batch {hidden.shape[0]}")
        packing = Packing(cu_seqlens, hidden.shape[1], hidden.device)
        valid = packing.pad(torch.ones_like(hidden[..., :1])).squeeze(-1)  # (num_seqs, max_len)
        return packing.unpad(self._forward(packing.pad(hidden), valid))

    def _forward(self, hidden: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
        b, length, _ = hidden.shape
        gn, h = self.ngroups * self.d_state, self.nheads
        z, xBC, dt = torch.split(self.in_proj(hidden), [self.d_inner, self.conv_dim, 2 * h], dim=-1)
        if valid is not None:
            xBC = xBC * valid[..., None]  # the official conv pads each sequence with zeros
        xBC = F.silu(self.conv1d(xBC.transpose(1, 2)).transpose(1, 2))
        x, B_fw, C_fw, B_bw, C_bw = torch.split(xBC, [self.d_inner, gn, gn, gn, gn], dim=-1)
        step = F.softplus(upcast(dt) + upcast(self.dt_bias).repeat(2))
        if valid is not None:
            step = step * valid[..., None]  # padded steps: decay 1, no input
        A = -torch.exp(upcast(self.A_log))
        xh = x.reshape(b, length, h, self.headdim)
        init = None
        if self.learnable_init_states:
            init = self.init_states.unsqueeze(0).expand(b, -1, -1, -1)
        kw = dict(dt_limit=self.dt_limit, initial_state=init, chunk_size=self.chunk_size,
                  negative_eigenvalues=self.negative_eigenvalues)
        grouped = lambda t: t.reshape(b, length, self.ngroups, self.d_state)  # noqa: E731
        y_fw = ssd_scan(xh, step[..., :h], A, grouped(B_fw), grouped(C_fw), **kw)
        y_bw = ssd_scan(xh, step[..., h:], A, grouped(B_bw), grouped(C_bw), reverse=True, **kw)
        # Shift each direction one step away from its own token; the diagonal is the fc_D term.
        y = F.pad(y_fw, (0, 0, 0, 0, 1, 0))[:, :length] + F.pad(y_bw, (0, 0, 0, 0, 0, 1))[:, 1:]
        diag = (self.fc_D(x) + self.D).unsqueeze(-1)  # (b, l, h, 1)
        y = (y + xh * diag).reshape(b, length, self.d_inner)
        return self.out_proj(self.norm(y, z))
