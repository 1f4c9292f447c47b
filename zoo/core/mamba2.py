"""Mamba-2 mixers: mamba-ssm's ``Mamba2`` layer (Dao & Gu, 2024) and a bidirectional variant.

Parameter names and shapes follow mamba-ssm (``in_proj`` to [z, x, B, C, dt], ``conv1d`` over xBC,
``dt_bias``, ``A_log`` and ``D`` per head, the gated RMSNorm ``norm``, ``out_proj``), so its checkpoints
load by name. Channels-last (batch, length, dim) throughout; the scan is ``zoo.core.ssd.ssd_scan``.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .checks import check_sizes
from .mamba import causal_conv1d, conv_history, conv_step, decode_A
from .norm import RMSNormGated
from .precision import upcast
from .ssd import ssd_scan, ssd_step


def _dt_bias(nheads: int, dt_min: float, dt_max: float, dt_init_floor: float, device) -> nn.Parameter:
    # softplus^-1 of dt ~ LogUniform(dt_min, dt_max), floored: mamba-ssm's Mamba2 init.
    dt = torch.exp(torch.rand(nheads, device=device) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_init_floor)
    bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
    bias._no_weight_decay = True
    return bias


def _A_log(nheads: int, A_init_range: Sequence[float], device) -> nn.Parameter:
    lo, hi = A_init_range
    if not 0 < lo <= hi:
        raise ValueError(f"Mamba2: A_init_range must be (low, high) with 0 < low <= high, got {tuple(A_init_range)}")
    A_log = nn.Parameter(torch.log(torch.empty(nheads, dtype=torch.float32, device=device).uniform_(lo, hi)))
    A_log._no_weight_decay = True
    return A_log


class Mamba2(nn.Module):
    """The Mamba-2 mixer: in_proj -> causal depthwise conv + SiLU over [x, B, C] -> SSD scan per head ->
    gated RMSNorm with z (or the gate inside the scan when ``rmsnorm=False``) -> out_proj.

    ``d_ssm`` < d_inner leaves d_inner - d_ssm channels to a gated MLP branch (silu(z0) * x0), as mamba-ssm.
    ``negative_eigenvalues``: per-head transitions 2 exp(dt A) - 1 in (-1, 1) (Grazzi et al., ICLR 2025).
    ``scan_hook`` (default None): a callable ``hook(mixer, ssd_scan, *args, **kwargs)`` run in place of the scan call
    of ``forward`` / ``forward_stream`` (not of ``step``), where :mod:`zoo.research.long_context` installs its methods.
    """

    scan_hook = None

    def __init__(
        self,
        d_model: int,
        d_state: int = 128,
        d_conv: int = 4,
        conv_init: Optional[float] = None,
        expand: int = 2,
        headdim: int = 64,
        d_ssm: Optional[int] = None,
        ngroups: int = 1,
        A_init_range: Sequence[float] = (1, 16),
        D_has_hdim: bool = False,
        rmsnorm: bool = True,
        norm_before_gate: bool = False,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_limit: Sequence[float] = (0.0, float("inf")),
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
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.d_ssm = self.d_inner if d_ssm is None else d_ssm
        if not 0 < self.d_ssm <= self.d_inner or self.d_ssm % headdim:
            raise ValueError(f"{name}: headdim={headdim} must divide d_ssm={self.d_ssm} (<= d_inner={self.d_inner})")
        self.headdim, self.nheads = headdim, self.d_ssm // headdim
        if self.nheads % ngroups:
            raise ValueError(f"{name}: ngroups={ngroups} must divide the number of heads d_ssm / headdim = {self.nheads}")
        self.ngroups, self.D_has_hdim, self.rmsnorm = ngroups, D_has_hdim, rmsnorm
        self.dt_limit, self.chunk_size, self.layer_idx = tuple(dt_limit), chunk_size, layer_idx
        self.d_mlp = self.d_inner - self.d_ssm
        self.negative_eigenvalues = negative_eigenvalues

        d_in_proj = 2 * self.d_inner + 2 * ngroups * d_state + self.nheads  # [z0, x0, z, x, B, C, dt]
        self.in_proj = nn.Linear(d_model, d_in_proj, bias=bias, **factory)
        self.conv_dim = self.d_ssm + 2 * ngroups * d_state
        self._add_direction("", conv_bias, conv_init, (A_init_range, dt_min, dt_max, dt_init_floor), factory)
        if rmsnorm:
            self.norm = RMSNormGated(self.d_ssm, eps=1e-5, norm_before_gate=norm_before_gate,
                                     group_size=self.d_ssm // ngroups, **factory)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

    def _add_direction(self, suffix: str, conv_bias: bool, conv_init, inits, factory) -> None:
        A_init_range, dt_min, dt_max, dt_init_floor = inits
        conv = nn.Conv1d(self.conv_dim, self.conv_dim, self.d_conv, groups=self.conv_dim, padding=self.d_conv - 1,
                         bias=conv_bias, **factory)
        if conv_init is not None:
            nn.init.uniform_(conv.weight, -conv_init, conv_init)
        setattr(self, "conv1d" + suffix, conv)
        setattr(self, "dt_bias" + suffix, _dt_bias(self.nheads, dt_min, dt_max, dt_init_floor, factory["device"]))
        # Names as mamba-ssm and Vim's fork: A_log / A_b_log, D / D_b.
        setattr(self, "A" + suffix + "_log", _A_log(self.nheads, A_init_range, factory["device"]))
        D = nn.Parameter(torch.ones(self.d_ssm if self.D_has_hdim else self.nheads, device=factory["device"]))
        D._no_weight_decay = True
        setattr(self, "D" + suffix, D)

    def _check_input(self, hidden: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None) -> None:
        if hidden.dim() != 3 or hidden.shape[-1] != self.d_model:
            raise ValueError(f"{type(self).__name__}: expected input of shape (batch, length, {self.d_model}), "
                             f"got {tuple(hidden.shape)}")
        if cu_seqlens is not None and hidden.shape[0] != 1:
            raise ValueError(f"{type(self).__name__}: packed sequences (cu_seqlens) need batch 1, got batch {hidden.shape[0]}")

    def _split(self, hidden: torch.Tensor):
        """in_proj -> (z0, x0, z, xBC, dt)."""
        return torch.split(self.in_proj(hidden), [self.d_mlp, self.d_mlp, self.d_ssm, self.conv_dim, self.nheads], dim=-1)

    def _scan_direction(self, xBC, z, dt, suffix="", reverse=False, cu_seqlens=None, state=None):
        """conv + SiLU over xBC -> SSD scan for one direction; (b, l, d_ssm), or with ``state`` = (conv_state,
        ssm_state) the output and the state after the last step."""
        conv = getattr(self, "conv1d" + suffix)
        conv_state, ssm_state = state if state is not None else (None, None)
        xBC_in = xBC
        xBC = causal_conv1d(xBC, conv.weight, conv.bias, reverse=reverse, cu_seqlens=cu_seqlens, conv_state=conv_state,
                            activation="silu")
        b, length = xBC.shape[:2]
        gn = self.ngroups * self.d_state
        x, B, C = torch.split(xBC, [self.d_ssm, gn, gn], dim=-1)
        D = getattr(self, "D" + suffix)
        scan = ssd_scan if self.scan_hook is None else partial(self.scan_hook, self, ssd_scan)
        out = scan(
            x.reshape(b, length, self.nheads, self.headdim), dt, -torch.exp(upcast(getattr(self, "A" + suffix + "_log"))),
            B.reshape(b, length, self.ngroups, self.d_state), C.reshape(b, length, self.ngroups, self.d_state),
            D=D.reshape(self.nheads, self.headdim) if self.D_has_hdim else D,
            z=None if self.rmsnorm else z.reshape(b, length, self.nheads, self.headdim),
            dt_bias=getattr(self, "dt_bias" + suffix), dt_softplus=True, dt_limit=self.dt_limit,
            initial_state=ssm_state, return_final_state=state is not None, cu_seqlens=cu_seqlens, reverse=reverse,
            chunk_size=self.chunk_size, negative_eigenvalues=self.negative_eigenvalues,
        )
        if state is None:
            return out.reshape(b, length, self.d_ssm)
        out, ssm_state = out
        return out.reshape(b, length, self.d_ssm), (conv_history(xBC_in, self.d_conv, conv_state, cu_seqlens), ssm_state)

    def _output(self, y, z, z0, x0):
        if self.rmsnorm:
            y = self.norm(y, z)
        if self.d_mlp:
            y = torch.cat([F.silu(z0) * x0, y], dim=-1)
        return self.out_proj(y)

    def forward(self, hidden: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(batch, length, d_model) -> same. ``cu_seqlens``: packed sequences in batch 1, kept apart."""
        self._check_input(hidden, cu_seqlens)
        z0, x0, z, xBC, dt = self._split(hidden)
        return self._output(self._scan_direction(xBC, z, dt, cu_seqlens=cu_seqlens), z, z0, x0)

    def forward_stream(self, hidden: torch.Tensor, state=None, cu_seqlens: Optional[torch.Tensor] = None):
        """One chunk of a stream (a prompt, or one token while decoding): returns (output, state) with
        state = (conv_state (b, d_conv - 1, conv_dim), ssm_state (b, nheads, headdim, d_state) in float32).
        Feeding a sequence chunk by chunk gives the output of one full ``forward``; memory per sequence is
        constant. ``cu_seqlens``: packed sequences (batch 1, from zero state), one state per sequence."""
        self._check_input(hidden, cu_seqlens)
        if cu_seqlens is not None and state is not None:
            raise ValueError(f"{type(self).__name__}: packed sequences (cu_seqlens) start from zero state; got a state")
        z0, x0, z, xBC, dt = self._split(hidden)
        y, state = self._scan_direction(xBC, z, dt, cu_seqlens=cu_seqlens, state=state if state is not None else (None, None))
        return self._output(y, z, z0, x0), state

    def step(self, hidden: torch.Tensor, state, inplace: bool = False):
        """One decoding step through ``ssd_step`` (the one-step state update): hidden (b, 1, d_model), state as
        ``forward_stream``'s. Returns (output (b, 1, d_model), new state); the state passed in is not modified,
        unless ``inplace`` (the new state is written over it)."""
        if hidden.dim() != 3 or hidden.shape[1] != 1 or hidden.shape[2] != self.d_model:
            raise ValueError(f"{type(self).__name__}.step: expected input (batch, 1, {self.d_model}), got {tuple(hidden.shape)}")
        conv_state, ssm_state = state
        z0, x0, z, xBC, dt = self._split(hidden[:, 0])
        xBC, conv_state = conv_step(xBC, conv_state, self.conv1d.weight, self.conv1d.bias, inplace=inplace)
        b, gn = xBC.shape[0], self.ngroups * self.d_state
        x, B, C = torch.split(xBC, [self.d_ssm, gn, gn], dim=-1)
        heads = (b, self.nheads, self.headdim)
        y, ssm_state = ssd_step(
            ssm_state, x.reshape(heads), dt, decode_A(self, self.A_log), B.reshape(b, self.ngroups, self.d_state),
            C.reshape(b, self.ngroups, self.d_state), D=self.D.reshape(self.nheads, self.headdim) if self.D_has_hdim else self.D,
            z=None if self.rmsnorm else z.reshape(heads), dt_bias=self.dt_bias, dt_softplus=True, dt_limit=self.dt_limit,
            negative_eigenvalues=self.negative_eigenvalues, inplace=inplace,
        )
        return self._output(y.reshape(b, self.d_ssm), z, z0, x0)[:, None], (conv_state, ssm_state)


class BiMamba2(Mamba2):
    """Bidirectional Mamba-2, in the manner of Vim's "bimamba v2": a second conv1d / dt_bias / A / D set
    (``*_b``) scans the sequence backwards (reverse scan, anti-causal conv, no flipped copies); the two scan
    outputs are summed (halved with ``divide_out``) before the shared gated norm and out_proj."""

    def __init__(self, d_model: int, *args, divide_out: bool = True, conv_bias: bool = True, conv_init=None,
                 A_init_range=(1, 16), dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4, device=None, dtype=None, **kwargs):
        super().__init__(d_model, *args, conv_bias=conv_bias, conv_init=conv_init, A_init_range=A_init_range,
                         dt_min=dt_min, dt_max=dt_max, dt_init_floor=dt_init_floor, device=device, dtype=dtype, **kwargs)
        self.divide_out = divide_out
        self._add_direction("_b", conv_bias, conv_init, (A_init_range, dt_min, dt_max, dt_init_floor),
                            {"device": device, "dtype": dtype})

    def forward(self, hidden: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        self._check_input(hidden, cu_seqlens)
        z0, x0, z, xBC, dt = self._split(hidden)
        y = self._scan_direction(xBC, z, dt, cu_seqlens=cu_seqlens) + self._scan_direction(
            xBC, z, dt, suffix="_b", reverse=True, cu_seqlens=cu_seqlens
        )
        if self.divide_out:
            y = y / 2
        return self._output(y, z, z0, x0)

    def forward_stream(self, hidden: torch.Tensor, state=None):
        raise NotImplementedError("BiMamba2 cannot stream: its backward scan needs the whole sequence; use Mamba2")
