"""Chimera: "Chimera: Effectively Modeling Multivariate Time Series with 2-Dimensional State Space Models"
(Behrouz, Santacatterina, Zabih, NeurIPS 2024, arXiv:2406.04320).

A multivariate series is a 2-D grid, variates x time; Chimera runs a 2-D state space model over it. Each cell
(v, t) has two hidden states: h1, which carries information along time (from (v, t-1)), and h2, which carries
information along the variates (from (v-1, t)); both read both states of their predecessor (a Roesser-type 2-D
recurrence). This module's recurrence, per channel d and state n, with every transition diagonal::

    h1[v, t] = exp(dt1 * A1) * h1[v, t-1] + dt1 * (A2 * h2[v, t-1] + B1[v, t] * x[v, t])
    h2[v, t] = exp(dt2 * A4) * h2[v-1, t] + dt2 * (A3 * h1[v-1, t] + B2[v, t] * x[v, t])
    y[v, t]  = sum_n C1[v, t, n] * h1[v, t, n] + C2[v, t, n] * h2[v, t, n]

with dt1, dt2 (per cell and channel) and B1, B2, C1, C2 (per cell) computed from the input: the paper's
input-dependent ("selective") parameters. ``chimera_scan_naive`` is that recurrence as a plain loop over the grid
(the oracle of the tests, float64-checkable); ``chimera_scan`` computes the same numbers exactly: h2 of variate v
depends only on variate v-1, so for v = 0, 1, ... it first forms h2[v, :] elementwise, then h1[v, :] is a 1-D
selective scan over time whose input is A2 * h2[v, t-1] + B1 x: that scan is the shared core's
``zoo.core.selective_scan`` (the (channel, state) pairs folded into the core's channels with d_state 1, so the
core returns the states themselves). V sequential steps, each one 1-D scan of length T.

What the paper specifies and this module follows (from the text reachable offline: the abstract and secondary
descriptions of the method, see the model card): a 2-D SSM over time and variates with input-dependent B, C and
step sizes dt; diagonal transition matrices; two SSM heads with different discretizations, a small time step
for long-term progression and a large one for seasonal patterns; because the variate axis has no natural order,
separate forward and backward modules along the variates; 2-D SSMs stacked with nonlinearities between them; a
data-dependent gate; a 2-D parallel selective scan with linear training cost (here: the exact variate-by-variate
decomposition above).

Choices that are this module's, not verified against the paper's equations (its full text and code were not
reachable here; no official code is public):

- Discretization: zero-order hold for each state's own transition (exp(dt1 A1), exp(dt2 A4)) and, as Mamba
  does for B, the Euler form dt * (.) for the input and for the cross-state terms A2, A3 (the other state is
  treated as an input held over the step). A1, A4 = -exp(log) (S4D-real init); A2, A3 free reals, init 0.5.
- The two heads are the two halves of the channels of one scan, each with its own B1, B2, C1, C2; they differ
  in the initial range of the time step dt1: [1e-3, 1e-2] (long-term) and [1e-1, 1] (seasonal); dt2 starts in
  [1e-3, 1e-1] for both. The forward and the backward variate directions are two scans with their own
  parameters (outputs summed). All four transitions are plain diagonal (the paper restricts A1, A2 to a
  structure that could not be read here).
- The block around the scans is Mamba's: Linear to (x, z), the heads on x, + D * x, times silu(z), Linear back;
  pre-norm residual layers, a final LayerNorm. No convolution, no seasonal-trend decomposition of the input, no
  closed-loop decoder.
- Embedding: each cell's scalar value by one Linear (1 -> d_model); with ``patch_len`` p > 1 (a zoo option, used
  by the CPU benchmark) a cell is p consecutive steps, embedded by Linear(p -> d_model). Readout for forecasting:
  Linear d_model -> head_dim per cell, then one Linear over (cells x head_dim) -> pred_len per variate (shared);
  for classification the mean over all cells and a Linear. Inputs normalised per instance and variate (RevIN
  without affine) as in the zoo's other forecasters.

The variate loop makes the cost grow with the number of variates as V sequential scans; fine for tens of
variates, slow for hundreds.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from zoo.core.checks import check_int, check_num_classes, check_rates, check_sizes
from zoo.core.selective_scan import selective_scan
from zoo.registry import build_model, register_model, register_pretrained_cfgs

from .common import ClassifierModel, EncoderHeadModel, ForecasterModel
from .smamba import instance_norm

__all__ = [
    "chimera_scan", "chimera_scan_naive", "Chimera2DHead", "ChimeraMixer", "ChimeraLayer", "ChimeraEncoder",
    "Chimera", "ChimeraClassifier",
]

_PAPER = ("Chimera: Effectively Modeling Multivariate Time Series with 2-Dimensional State Space Models "
          "(Behrouz, Santacatterina, Zabih, NeurIPS 2024, arXiv:2406.04320)")
_SOURCE = "https://arxiv.org/abs/2406.04320"
_LICENSE = "Apache-2.0 (mamba-zoo's implementation; no official code is public)"


# --- the 2-D scan ------------------------------------------------------------------------------------------

def _check_scan(name, x, dt1, dt2, A1, A2, A3, A4, B1, B2, C1, C2, D):
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{name}: expected x of shape (batch, variates, time, dim), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    b, v, t, d = x.shape
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected floating-point x, got {x.dtype}")
    for key, value in (("dt1", dt1), ("dt2", dt2)):
        if tuple(value.shape) != (b, v, t, d):
            raise ValueError(f"{name}: expected {key} of shape {(b, v, t, d)}, got {tuple(value.shape)}")
    if A1.dim() != 2 or A1.shape[0] != d:
        raise ValueError(f"{name}: expected A1 of shape ({d}, d_state), got {tuple(A1.shape)}")
    n = A1.shape[1]
    for key, value in (("A2", A2), ("A3", A3), ("A4", A4)):
        if tuple(value.shape) != (d, n):
            raise ValueError(f"{name}: expected {key} of shape {(d, n)}, got {tuple(value.shape)}")
    groups = None
    for key, value in (("B1", B1), ("B2", B2), ("C1", C1), ("C2", C2)):
        ok = tuple(value.shape[:3]) == (b, v, t) and value.shape[-1] == n and value.dim() in (4, 5)
        if ok and value.dim() == 5:
            ok = d % value.shape[3] == 0 and groups in (None, value.shape[3])
            groups = value.shape[3]
        elif ok:
            ok = groups in (None, 1)
            groups = 1
        if not ok:
            raise ValueError(
                f"{name}: expected {key} of shape {(b, v, t, n)}, or (batch, variates, time, groups, d_state) with "
                f"groups dividing dim={d} and the same for B1, B2, C1, C2, got {tuple(value.shape)}"
            )
    if D is not None and tuple(D.shape) != (d,):
        raise ValueError(f"{name}: expected D of shape ({d},), got {tuple(D.shape)}")


def _per_channel(BC: torch.Tensor, d: int) -> torch.Tensor:
    """(b, V, T, n) or (b, V, T, G, n) -> (b, V, T, d, n): channel c reads group c // (d // G)."""
    if BC.dim() == 4:
        return BC[..., None, :].expand(*BC.shape[:3], d, BC.shape[-1])
    return BC.repeat_interleave(d // BC.shape[3], dim=3)


def _grouped(BC: torch.Tensor) -> torch.Tensor:
    """(b, V, T, n) or (b, V, T, G, n) -> (V, b, T, G, 1, n), to broadcast against (V, b, T, G, d // G, n)."""
    if BC.dim() == 4:
        BC = BC[:, :, :, None]
    return BC.movedim(1, 0)[..., None, :]


def chimera_scan_naive(x, dt1, dt2, A1, A2, A3, A4, B1, B2, C1, C2, D=None, return_states: bool = False):
    """The 2-D recurrence (module docstring) as a plain loop over variates and time: the oracle.

    x, dt1, dt2: (batch, variates, time, dim) (dt already positive); A1..A4: (dim, d_state); B1, B2, C1, C2:
    (batch, variates, time, d_state); D: (dim,) or None. Returns y (batch, variates, time, dim) in float64 for
    float64 inputs (float32 otherwise), and with ``return_states`` also h1, h2 (batch, variates, time, dim, d_state).
    """
    _check_scan("chimera_scan_naive", x, dt1, dt2, A1, A2, A3, A4, B1, B2, C1, C2, D)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, dt1, dt2, A1, A2, A3, A4 = (z.to(acc) for z in (x, dt1, dt2, A1, A2, A3, A4))
    b, V, T, d = x.shape
    B1, B2, C1, C2 = (_per_channel(z.to(acc), d) for z in (B1, B2, C1, C2))  # (b, V, T, d, n)
    n = A1.shape[1]
    zero = x.new_zeros(b, d, n)
    h1 = [[None] * T for _ in range(V)]
    h2 = [[None] * T for _ in range(V)]
    ys = []
    for v in range(V):
        row = []
        for t in range(T):
            xi = x[:, v, t, :, None]
            p1, q1 = (h1[v][t - 1], h2[v][t - 1]) if t > 0 else (zero, zero)   # (v, t-1)
            p2, q2 = (h1[v - 1][t], h2[v - 1][t]) if v > 0 else (zero, zero)   # (v-1, t)
            a1 = dt1[:, v, t, :, None]
            a2 = dt2[:, v, t, :, None]
            h1[v][t] = torch.exp(a1 * A1) * p1 + a1 * (A2 * q1 + B1[:, v, t] * xi)
            h2[v][t] = torch.exp(a2 * A4) * q2 + a2 * (A3 * p2 + B2[:, v, t] * xi)
            y = (h1[v][t] * C1[:, v, t]).sum(-1) + (h2[v][t] * C2[:, v, t]).sum(-1)
            row.append(y if D is None else y + D.to(acc) * x[:, v, t])
        ys.append(torch.stack(row, 1))
    y = torch.stack(ys, 1)
    if not return_states:
        return y
    states = [torch.stack([torch.stack(h[v], 1) for v in range(V)], 1) for h in (h1, h2)]
    return y, states[0], states[1]


def chimera_scan(x, dt1, dt2, A1, A2, A3, A4, B1, B2, C1, C2, D=None, return_states: bool = False,
                 impl: str = "auto"):
    """The 2-D recurrence (same arguments and result as ``chimera_scan_naive``), computed as one 1-D selective
    scan over time per variate by the shared core (``impl`` picks its path), the variate axis carried in between.

    Exact, not an approximation: h2 of variate v needs only variate v-1's states, and given h2[v, :] the time
    recurrence of h1[v, :] is a 1-D linear scan with decay exp(dt1 A1) and input dt1 * (A2 h2[v, t-1] + B1 x).
    The (dim, d_state) pairs are the core's channels with d_state 1 (input, decay and state differ per pair), so
    its output with C = 1 is the state h1 itself. Returns y in x's dtype (float64 for float64, else float32 states)."""
    _check_scan("chimera_scan", x, dt1, dt2, A1, A2, A3, A4, B1, B2, C1, C2, D)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    b, V, T, d = x.shape
    n = A1.shape[1]
    G = 1 if B1.dim() == 4 else B1.shape[3]
    # Variates first, so that each step reads contiguous slices; the channels as (G, d // G) groups, which read
    # their group's B and C; everything that does not depend on the carried states is formed for all variates
    # at once.
    shape = (V, b, T, G, d // G, 1)
    xs = x.to(acc).movedim(1, 0).reshape(shape)
    dt1, dt2 = (z.to(acc).movedim(1, 0).reshape(shape) for z in (dt1, dt2))
    B1, B2, C1, C2 = (_grouped(z.to(acc)) for z in (B1, B2, C1, C2))  # (V, b, T, G, 1, n)
    A1, A2, A3, A4 = (z.to(acc).reshape(G, d // G, n) for z in (A1, A2, A3, A4))
    decay2 = torch.exp(dt2 * A4)                  # (V, b, T, G, d // G, n)
    cross2 = dt2 * A3
    in2 = (dt2 * xs) * B2
    in1 = xs * B1
    delta = dt1.expand(*shape[:-1], n).reshape(V, b, T, d * n)
    A_core = A1.reshape(d * n, 1)
    ones = xs.new_ones(b, T, 1)
    h1 = h2 = None
    ys, h1s, h2s = [], [], []
    for v in range(V):
        h2 = in2[v] if v == 0 else in2[v] + decay2[v] * h2 + cross2[v] * h1
        drive = in1[v] + F.pad(A2 * h2[:, :-1], (0, 0, 0, 0, 0, 0, 1, 0))   # A2 h2[v, t-1] + B1 x
        h1 = selective_scan(drive.reshape(b, T, d * n), delta[v], A_core, ones, ones, impl=impl).reshape(h2.shape)
        ys.append(((h1 * C1[v]).sum(-1) + (h2 * C2[v]).sum(-1)).reshape(b, T, d))
        if return_states:
            h1s.append(h1.reshape(b, T, d, n))
            h2s.append(h2.reshape(b, T, d, n))
    y = torch.stack(ys, 1)
    if D is not None:
        y = y + D.to(acc) * x.to(acc)
    y = y.to(x.dtype)
    return (y, torch.stack(h1s, 1), torch.stack(h2s, 1)) if return_states else y


# --- layers ------------------------------------------------------------------------------------------------

def _inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    return x + torch.log(-torch.expm1(-x))


class Chimera2DHead(nn.Module):
    """Input-dependent 2-D SSMs over (batch, variates, time, d_inner) in one scan: the channels split into one group
    per entry of ``dt1_ranges`` (the paper's heads: a small initial time step for long-term progression, a large
    one for seasonal patterns), each group with its own B1, B2, C1, C2 (from the input) and initial range of dt1;
    dt1, dt2 per channel from the input; A1..A4 per channel and state. ``reverse`` runs the variate axis from the
    last variate to the first."""

    def __init__(self, d_inner: int, d_state: int, dt_rank: int, dt1_ranges=((1e-3, 1e-2), (1e-1, 1.0)),
                 dt2_range=(1e-3, 1e-1), reverse: bool = False):
        super().__init__()
        groups = len(dt1_ranges)
        if d_inner % groups:
            raise ValueError(f"Chimera: the inner width {d_inner} must be a multiple of the number of heads {groups}")
        self.d_inner, self.d_state, self.dt_rank, self.groups, self.reverse = d_inner, d_state, dt_rank, groups, reverse
        self.x_proj = nn.Linear(d_inner, 2 * dt_rank + 4 * groups * d_state, bias=False)
        self.dt1_proj = nn.Linear(dt_rank, d_inner)
        self.dt2_proj = nn.Linear(dt_rank, d_inner)
        width = d_inner // groups
        for proj, ranges in ((self.dt1_proj, dt1_ranges), (self.dt2_proj, [dt2_range] * groups)):
            nn.init.uniform_(proj.weight, -dt_rank ** -0.5, dt_rank ** -0.5)
            lo = torch.tensor([math.log(r[0]) for r in ranges]).repeat_interleave(width)
            hi = torch.tensor([math.log(r[1]) for r in ranges]).repeat_interleave(width)
            dt = torch.exp(lo + torch.rand(d_inner) * (hi - lo))
            with torch.no_grad():
                proj.bias.copy_(_inverse_softplus(dt))
        log_a = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1)
        self.A1_log = nn.Parameter(log_a.clone())
        self.A4_log = nn.Parameter(log_a.clone())
        self.A2 = nn.Parameter(torch.full((d_inner, d_state), 0.5))
        self.A3 = nn.Parameter(torch.full((d_inner, d_state), 0.5))
        for p in (self.A1_log, self.A4_log, self.A2, self.A3):
            p._no_weight_decay = True

    def scan_args(self, u: torch.Tensor):
        """The scan's arguments (dt1, dt2, A1..A4, B1, B2, C1, C2) for the input u (b, V, T, d_inner); B and C
        are (b, V, T, groups, d_state)."""
        r, k = self.dt_rank, self.groups * self.d_state
        dt1_in, dt2_in, bc = self.x_proj(u).split([r, r, 4 * k], dim=-1)
        B1, B2, C1, C2 = bc.unflatten(-1, (4, self.groups, self.d_state)).unbind(-3)
        dt1 = F.softplus(self.dt1_proj(dt1_in))
        dt2 = F.softplus(self.dt2_proj(dt2_in))
        return dt1, dt2, -torch.exp(self.A1_log), self.A2, self.A3, -torch.exp(self.A4_log), B1, B2, C1, C2

    def forward(self, u: torch.Tensor, scan=chimera_scan) -> torch.Tensor:
        if self.reverse:
            u = u.flip(1)
        y = scan(u, *self.scan_args(u))
        return y.flip(1) if self.reverse else y


class ChimeraMixer(nn.Module):
    """Linear to (x, z); the 2-D SSM on x in both variate directions (each with the long-term and the seasonal
    head), summed, + D * x, gated by silu(z); Linear back. (batch, variates, time, d_model) -> same."""

    HEADS = {"long_term": (1e-3, 1e-2), "seasonal": (1e-1, 1.0)}

    def __init__(self, d_model: int, d_state: int = 16, expand: float = 1, bidirectional: bool = True,
                 dt_rank: Optional[int] = None):
        super().__init__()
        d_inner = int(expand * d_model)
        check_sizes("Chimera", d_inner=d_inner)
        dt_rank = dt_rank or math.ceil(d_model / 16)
        self.d_inner = d_inner
        self.in_proj = nn.Linear(d_model, 2 * d_inner)
        ranges = tuple(self.HEADS.values())
        self.fwd = Chimera2DHead(d_inner, d_state, dt_rank, ranges)
        self.bwd = Chimera2DHead(d_inner, d_state, dt_rank, ranges, reverse=True) if bidirectional else None
        self.D = nn.Parameter(torch.ones(d_inner))
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(d_inner, d_model)

    def forward(self, x: torch.Tensor, scan=chimera_scan) -> torch.Tensor:
        u, z = self.in_proj(x).chunk(2, dim=-1)
        y = u * self.D + self.fwd(u, scan=scan)
        if self.bwd is not None:
            y = y + self.bwd(u, scan=scan)
        return self.out_proj(y * F.silu(z))


class ChimeraLayer(nn.Module):
    """x <- x + dropout(mixer(LN(x))) over the (variates, time) grid of d_model channels."""

    def __init__(self, d_model: int, d_state: int = 16, expand: float = 1, dropout: float = 0.1,
                 bidirectional: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.mixer = ChimeraMixer(d_model, d_state, expand, bidirectional)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, scan=chimera_scan) -> torch.Tensor:
        return x + self.drop(self.mixer(self.norm(x), scan=scan))


class ChimeraEncoder(nn.Module):
    """Cell embedding and the stack of 2-D SSM layers: (batch, time, variates) -> (batch, variates, cells, d_model).

    A cell is one time step of one variate (``patch_len`` 1, the paper's grid), or with ``patch_len`` p > 1 a patch
    of p consecutive steps (the zoo's option, p times fewer cells along time; the series is padded at its start by
    repeating its first value to a multiple of p). Each cell's p values are embedded by one Linear (p -> d_model)."""

    def __init__(self, d_model: int, e_layers: int, d_state: int, expand: float, dropout: float,
                 bidirectional: bool = True, patch_len: int = 1):
        super().__init__()
        check_sizes("Chimera", d_model=d_model, e_layers=e_layers, d_state=d_state, patch_len=patch_len)
        check_rates("Chimera", dropout=dropout)
        if isinstance(expand, bool) or not isinstance(expand, (int, float)) or expand <= 0:
            raise ValueError(f"Chimera: expand must be a number > 0, got {expand!r}")
        self.patch_len = patch_len
        self.embed = nn.Linear(patch_len, d_model)
        self.embed_drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(ChimeraLayer(d_model, d_state, expand, dropout, bidirectional) for _ in range(e_layers))
        self.norm = nn.LayerNorm(d_model)
        self.grad_checkpointing = False

    def num_cells(self, seq_len: int) -> int:
        return -(-seq_len // self.patch_len)

    def forward(self, x: torch.Tensor, scan=chimera_scan) -> torch.Tensor:
        series = x.transpose(1, 2)                                   # (b, V, T)
        pad = -series.shape[-1] % self.patch_len
        if pad:
            series = torch.cat([series[..., :1].expand(*series.shape[:2], pad), series], -1)
        cells = series.unflatten(-1, (-1, self.patch_len))          # (b, V, T / p, p)
        h = self.embed_drop(self.embed(cells))
        for layer in self.layers:
            if self.grad_checkpointing and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(partial(layer, scan=scan), h, use_reentrant=False)
            else:
                h = layer(h, scan=scan)
        return self.norm(h)


def _check_input(name: str, x: torch.Tensor, seq_len: int, enc_in: Optional[int]):
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[1] != seq_len or (enc_in is not None and x.shape[2] != enc_in):
        n = enc_in if enc_in is not None else "n_variates"
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected input of shape (batch, {seq_len}, {n}), got {got}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point series, got {x.dtype}")
    if x.shape[2] < 1:
        raise ValueError(f"{name}: expected at least one variate, got {tuple(x.shape)}")


class _ChimeraBase(EncoderHeadModel):
    feature_dim = -1  # forward_features: (batch, variates, cells, d_model), channels last


class Chimera(_ChimeraBase, ForecasterModel):
    """Chimera forecaster: (batch, seq_len, n_variates) -> (batch, pred_len, n_variates).

    ``x_mark`` (timestamp features) is accepted for the pipelines' sake and not used."""

    def __init__(
        self, seq_len: int = 96, pred_len: int = 96, enc_in: Optional[int] = None, d_model: int = 128,
        d_state: int = 16, e_layers: int = 2, expand: float = 1, head_dim: int = 16, dropout: float = 0.1,
        use_norm: bool = True, bidirectional: bool = True, patch_len: int = 1,
    ):
        super().__init__()
        check_sizes("Chimera", seq_len=seq_len, pred_len=pred_len, head_dim=head_dim)
        check_int("Chimera: enc_in", enc_in, 1, optional=True)
        self.seq_len, self.pred_len, self.enc_in, self.use_norm, self.head_dim = seq_len, pred_len, enc_in, use_norm, head_dim
        self.num_features = d_model
        self.encoder = ChimeraEncoder(d_model, e_layers, d_state, expand, dropout, bidirectional, patch_len)
        self.head_proj = nn.Linear(d_model, head_dim)
        self.head_hidden_size = self.encoder.num_cells(seq_len) * head_dim  # the head reads a variate's cells flattened
        self.head = nn.Linear(self.head_hidden_size, pred_len)
        self.pretrained_cfg: dict = {}

    def forward_features(self, x: torch.Tensor, scan=chimera_scan) -> torch.Tensor:
        """Encoded cells (batch, n_variates, cells, d_model) of an already normalised input."""
        return self.encoder(x, scan=scan)

    def forward_head(self, cells: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(batch, variates, cells, d_model) -> (batch, pred_len, variates); ``pre_logits``: the flattened readout
        features (batch, variates, cells * head_dim)."""
        feats = self.head_proj(cells).flatten(2)
        return feats if pre_logits else self.head(feats).transpose(1, 2)

    def forward(self, x: torch.Tensor, x_mark: Optional[torch.Tensor] = None, scan=chimera_scan) -> torch.Tensor:
        _check_input(type(self).__name__, x, self.seq_len, self.enc_in)
        if self.use_norm:
            x, mean, std = instance_norm(x)
        out = self.forward_head(self.forward_features(x, scan=scan))
        return out * std + mean if self.use_norm else out


class ChimeraClassifier(_ChimeraBase, ClassifierModel):
    """The Chimera encoder for series classification: cells -> encoder -> mean over all cells -> Linear.
    Input (batch, seq_len, n_variates), logits (batch, num_classes)."""

    def __init__(
        self, seq_len: int, num_classes: int, enc_in: Optional[int] = None, d_model: int = 64, d_state: int = 16,
        e_layers: int = 2, expand: float = 1, dropout: float = 0.1, use_norm: bool = True, bidirectional: bool = True,
        patch_len: int = 1,
    ):
        super().__init__()
        check_sizes("ChimeraClassifier", seq_len=seq_len)
        check_num_classes("ChimeraClassifier", num_classes)
        check_int("ChimeraClassifier: enc_in", enc_in, 1, optional=True)
        self.seq_len, self.enc_in, self.use_norm = seq_len, enc_in, use_norm
        self.num_classes, self.num_features = num_classes, d_model
        self.encoder = ChimeraEncoder(d_model, e_layers, d_state, expand, dropout, bidirectional, patch_len)
        self.head = nn.Linear(d_model, num_classes) if num_classes > 0 else nn.Identity()
        self.head_hidden_size = d_model
        self.pretrained_cfg: dict = {}

    def forward_features(self, x: torch.Tensor, scan=chimera_scan) -> torch.Tensor:
        _check_input(type(self).__name__, x, self.seq_len, self.enc_in)
        if self.use_norm:
            x = instance_norm(x)[0]
        return self.encoder(x, scan=scan)

    def forward_head(self, cells: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = cells.mean((1, 2))
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: torch.Tensor, scan=chimera_scan) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, scan=scan))


# --- registry ----------------------------------------------------------------------------------------------

_HEAD_CFG = dict(first_conv="encoder.embed", classifier="head")
register_pretrained_cfgs({
    "chimera": dict(license=_LICENSE, paper=_PAPER, source=_SOURCE, input_size=(96, 7),
                    notes="implementation from the paper's description (choices listed in the module docstring and "
                          "the card); no released weights", **_HEAD_CFG),
    "chimera_classifier": dict(license=_LICENSE, paper=_PAPER, source=_SOURCE,
                               notes="the Chimera encoder with a mean-pooled classification head; no released weights",
                               **_HEAD_CFG),
})


@register_model
def chimera(pretrained: bool = False, **kwargs) -> Chimera:
    """Chimera forecaster (2-D selective SSM over variates x time) with free hyper-parameters."""
    return build_model(Chimera, "chimera", pretrained, **kwargs)


@register_model
def chimera_classifier(pretrained: bool = False, **kwargs) -> ChimeraClassifier:
    """Chimera encoder with a mean-pooled classification head."""
    return build_model(ChimeraClassifier, "chimera_classifier", pretrained, **kwargs)
