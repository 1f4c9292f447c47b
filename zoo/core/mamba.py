"""Mamba-1 mixers: the selective SSM layer of mamba-ssm and Vim's bidirectional (v2) variant.

Parameter names follow mamba-ssm (``in_proj``, ``conv1d``, ``x_proj``, ``dt_proj``, ``A_log``,
``D``, ``out_proj``) and Vim's fork (``*_b`` for the backward direction), so official
checkpoints load by name. Everything runs channels-last (batch, length, dim).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .selective_scan import selective_scan


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], reverse: bool = False) -> torch.Tensor:
    """Depthwise conv over length, (b, l, d) -> (b, l, d); output t sees inputs t-k+1..t
    (t..t+k-1 with ``reverse``, i.e. the causal conv of the flipped sequence, flipped back)."""
    k = weight.shape[-1]
    xt = x.transpose(1, 2)
    if reverse:
        out = F.conv1d(xt, weight.flip(-1), bias, padding=k - 1, groups=xt.shape[1])[..., k - 1 :]
    else:
        out = F.conv1d(xt, weight, bias, padding=k - 1, groups=xt.shape[1])[..., : x.shape[1]]
    return out.transpose(1, 2)


def _make_dt_proj(dt_rank, d_inner, dt_min, dt_max, dt_init, dt_scale, dt_init_floor, factory):
    dt_proj = nn.Linear(dt_rank, d_inner, bias=True, **factory)
    # Weight init that keeps the variance of dt; bias = softplus^-1 of dt ~ LogUniform(dt_min, dt_max).
    std = dt_rank**-0.5 * dt_scale
    if dt_init == "constant":
        nn.init.constant_(dt_proj.weight, std)
    elif dt_init == "random":
        nn.init.uniform_(dt_proj.weight, -std, std)
    else:
        raise ValueError(f"Mamba: dt_init must be 'random' or 'constant', got {dt_init!r}")
    dt = torch.exp(
        torch.rand(d_inner, **factory) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
    ).clamp(min=dt_init_floor)
    inv_dt = dt + torch.log(-torch.expm1(-dt))
    with torch.no_grad():
        dt_proj.bias.copy_(inv_dt)
    dt_proj.bias._no_reinit = True  # init_mamba_weights must not zero it
    return dt_proj


def _make_A_log(d_inner, d_state, device):
    # S4D-real init: A[d, n] = -(n + 1); stored as log(-A) in float32.
    A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(d_inner, 1)
    A_log = nn.Parameter(torch.log(A))
    A_log._no_weight_decay = True
    return A_log


def _make_D(d_inner, device):
    D = nn.Parameter(torch.ones(d_inner, device=device))
    D._no_weight_decay = True
    return D


class Mamba(nn.Module):
    """The Mamba-1 mixer (Gu & Dao, 2023): in_proj -> causal depthwise conv -> SiLU -> selective
    scan gated by SiLU(z) -> out_proj."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: float = 2,
        dt_rank="auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        layer_idx: Optional[int] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.layer_idx = layer_idx
        self._dt_init = (dt_min, dt_max, dt_init, dt_scale, dt_init_floor)
        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=bias, **factory)
        self._add_direction("", conv_bias, factory)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

    def _add_direction(self, suffix: str, conv_bias: bool, factory: dict) -> None:
        """Create conv1d, x_proj, dt_proj, A_log, D (names + suffix) for one scan direction."""
        d_inner = self.d_inner
        setattr(self, "conv1d" + suffix, nn.Conv1d(
            d_inner, d_inner, kernel_size=self.d_conv, groups=d_inner, padding=self.d_conv - 1, bias=conv_bias, **factory
        ))
        setattr(self, "x_proj" + suffix, nn.Linear(d_inner, self.dt_rank + 2 * self.d_state, bias=False, **factory))
        setattr(self, "dt_proj" + suffix, _make_dt_proj(self.dt_rank, d_inner, *self._dt_init, factory))
        # A_log / D keep the official names: "A_log"/"A_b_log", "D"/"D_b".
        setattr(self, "A" + suffix + "_log", _make_A_log(d_inner, self.d_state, factory["device"]))
        setattr(self, "D" + suffix, _make_D(d_inner, factory["device"]))

    def _scan_direction(self, x: torch.Tensor, z: torch.Tensor, suffix: str = "", reverse: bool = False) -> torch.Tensor:
        """conv -> SiLU -> x_proj -> dt_proj -> gated selective scan for one direction; (b, l, d_inner)."""
        conv = getattr(self, "conv1d" + suffix)
        x_proj = getattr(self, "x_proj" + suffix)
        dt_proj = getattr(self, "dt_proj" + suffix)
        A = -torch.exp(getattr(self, "A" + suffix + "_log").float())
        D = getattr(self, "D" + suffix)
        x = F.silu(causal_conv1d(x, conv.weight, conv.bias, reverse=reverse))
        dt, B, C = torch.split(x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        # dt_proj's bias enters the scan as delta_bias (inside the softplus), as in mamba-ssm.
        dt = F.linear(dt, dt_proj.weight)
        return selective_scan(
            x, dt, A, B, C, D=D.float(), z=z, delta_bias=dt_proj.bias.float(), delta_softplus=True, reverse=reverse
        )

    def _check_input(self, hidden: torch.Tensor) -> None:
        if hidden.dim() != 3 or hidden.shape[-1] != self.d_model:
            raise ValueError(
                f"{type(self).__name__}: expected input of shape (batch, length, {self.d_model}), got {tuple(hidden.shape)}"
            )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self._check_input(hidden)
        x, z = self.in_proj(hidden).chunk(2, dim=-1)
        return self.out_proj(self._scan_direction(x, z))


class BiMamba(Mamba):
    """Vim's bidirectional mixer ("bimamba v2"): a second conv/x_proj/dt_proj/A/D set scans the
    sequence backwards; both gated outputs are summed (and halved with ``divide_out``) before the
    shared out_proj. The backward direction is a reverse scan with an anti-causal conv, which
    equals Vim's flip -> causal mamba -> flip without copying the sequence.

    Deliberate deviation, initialisation only: Vim's fork leaves dt_proj_b at PyTorch's default
    init and its bias is then zeroed by _init_weights (softplus(0) = 0.69 for every channel); here
    the backward direction gets the same dt init as the forward one (LogUniform(dt_min, dt_max)).
    Checkpoints and the forward are unaffected."""

    def __init__(self, d_model: int, *args, divide_out: bool = True, conv_bias: bool = True, device=None, dtype=None, **kwargs):
        super().__init__(d_model, *args, conv_bias=conv_bias, device=device, dtype=dtype, **kwargs)
        self.divide_out = divide_out
        self._add_direction("_b", conv_bias, {"device": device, "dtype": dtype})

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self._check_input(hidden)
        x, z = self.in_proj(hidden).chunk(2, dim=-1)
        y = self._scan_direction(x, z) + self._scan_direction(x, z, suffix="_b", reverse=True)
        if self.divide_out:
            y = y / 2
        return self.out_proj(y)
