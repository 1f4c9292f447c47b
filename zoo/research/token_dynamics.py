"""Token-dynamics diagnostics for any zoo model (Vo, Pham, Tong & Nguyen, "Demystifying the Token
Dynamics of Deep Selective State Space Models", ICLR 2025, arXiv:2410.03292).

The paper reads a deep stack of S6 layers as a continuous-time system in which every token evolves
under the layer's input/output interaction. With the S6 parameterisation (the paper's notation)

    B_l = S_B x_l,   C_l = S_C x_l,   Delta_l = softplus(S_Delta x_l + b_Delta),
    h_l = exp(Delta_l A) h_{l-1} + Delta_l B_l x_l,   y_l = C_l^T h_l,

the token x_l is driven by sum_{j<=l} x_l^T S_C^T (...) S_B x_j, so the sign of the input/output
matrix S_C^T S_B decides the dynamics. In the one-dimensional case (the paper's main theorem)
exactly one of two scenarios happens: S_C^T S_B < 0 -> every token converges to zero (the
*convergent* scenario, shown to hurt accuracy); S_C^T S_B > 0 -> every token diverges (the
*divergent* scenario), tokens with a larger step S_Delta x_l diverging faster and so weighing more
in training. In higher dimension the paper's experiments (its Figure 6 and the WikiText-103
"positive / negative / mixed eigenvalue" runs) classify by the eigenvalues of S_C^T S_B: all
eigenvalues negative -> convergent; at least one positive -> divergent.

Here, per mixer and scan direction: S_B, S_C are the B and C rows of ``x_proj`` (with the
``bc_sign`` refinement, S_C = G S_B with G diagonal), S_Delta = dt_proj.weight @ x_proj's dt rows, b_Delta =
dt_proj.bias. The non-zero eigenvalues of the (d_inner x d_inner) matrix S_C^T S_B are those of the
(d_state x d_state) matrix S_B S_C^T, which is what is decomposed.

Token importance score (the reordering refinement; K S_Delta x as in the authors' released code): s_l = K^T (S_Delta x_l + b_Delta),
the pre-softplus step of token l read by a vector K (learned when the mixer has
``reorder_tokens``; otherwise K = 1/d_inner, the mean step logit), where x_l is the layer's scan
input (after in_proj, the depthwise conv and SiLU).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from zoo.core.mamba import Mamba, causal_conv1d

SCENARIOS = ("convergent", "divergent", "degenerate")


def find_mixers(model: nn.Module) -> List[Tuple[str, Mamba]]:
    """(name, mixer) for every Mamba-1 mixer (Mamba, BiMamba and subclasses) in ``model``."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Mamba)]


def direction_matrices(mixer: Mamba, suffix: str = "") -> Dict[str, torch.Tensor]:
    """S_B, S_C (d_state, d_inner), S_Delta (d_inner, d_inner), b_Delta (d_inner,) of one direction
    ("" forward, "_b" backward), in float32, as the mixer uses them."""
    w = getattr(mixer, "x_proj" + suffix).weight.detach().float()
    r, n = mixer.dt_rank, mixer.d_state
    s_b, s_c = w[r : r + n], w[r + n : r + 2 * n]
    if mixer.bc_sign is not None:
        s_c = mixer.signed_c_gain(suffix).detach().float()[:, None] * s_b
    dt_proj = getattr(mixer, "dt_proj" + suffix)
    return dict(S_B=s_b, S_C=s_c, S_Delta=dt_proj.weight.detach().float() @ w[:r], b_Delta=dt_proj.bias.detach().float())


def io_eigenvalues(s_b: torch.Tensor, s_c: torch.Tensor) -> torch.Tensor:
    """Non-zero spectrum of S_C^T S_B, computed as the eigenvalues of S_B S_C^T (complex, d_state)."""
    if s_b.shape != s_c.shape:
        raise ValueError(f"io_eigenvalues: S_B and S_C must have the same shape, got {tuple(s_b.shape)} and {tuple(s_c.shape)}")
    return torch.linalg.eigvals((s_b.double() @ s_c.double().T))


def classify(eigenvalues: torch.Tensor, rtol: float = 1e-6) -> str:
    """The paper's criterion: 'convergent' when every eigenvalue of S_C^T S_B has negative real part,
    'divergent' when at least one has positive real part, 'degenerate' when all are ~0 (S_C^T S_B = 0:
    the layer has no token interaction)."""
    real = eigenvalues.real
    tol = rtol * max(float(eigenvalues.abs().max()), 1e-30)
    if bool((real > tol).any()):
        return "divergent"
    if bool((real < -tol).all()):
        return "convergent"
    return "degenerate"


@dataclass
class DirectionReport:
    layer: str
    direction: str
    scenario: str
    positive: int  # eigenvalues with positive real part
    negative: int
    max_real: float
    min_real: float
    importance: Optional[torch.Tensor] = field(default=None, repr=False)  # (batch, length)

    def summary(self) -> Dict:
        out = {k: v for k, v in asdict(self).items() if k != "importance"}
        if self.importance is not None:
            s = self.importance.float()
            out.update(importance_mean=float(s.mean()), importance_std=float(s.std()),
                       top_tokens=s.mean(0).argsort(descending=True)[:5].tolist())
        return out


def scan_inputs(mixer: Mamba, hidden: torch.Tensor, suffix: str = "") -> torch.Tensor:
    """x_l of one direction: SiLU(depthwise conv(in_proj(hidden)'s x half)), (batch, length, d_inner)."""
    x = mixer.in_proj(hidden).chunk(2, dim=-1)[0]
    conv = getattr(mixer, "conv1d" + suffix)
    return causal_conv1d(x, conv.weight, conv.bias, reverse=suffix == "_b", activation="silu")


def importance_scores(mixer: Mamba, hidden: torch.Tensor, suffix: str = "") -> torch.Tensor:
    """s_l = K^T (S_Delta x_l + b_Delta) for every token of ``hidden`` (the mixer's input), (batch, length)."""
    mats = direction_matrices(mixer, suffix)
    x = scan_inputs(mixer, hidden.float() if hidden.dtype != torch.float64 else hidden, suffix).float()
    step = x @ mats["S_Delta"].T + mats["b_Delta"]
    k = getattr(mixer, "importance" + suffix).weight.detach().float()[0] if mixer.reorder_tokens else \
        torch.full((mixer.d_inner,), 1.0 / mixer.d_inner, device=step.device)
    return step @ k


@torch.no_grad()
def token_dynamics_report(model: nn.Module, *inputs, **kwargs) -> List[DirectionReport]:
    """Run ``model(*inputs, **kwargs)`` once and report every mixer direction: the scenario its
    parameters put it in, its eigenvalue counts, and the importance score of every token it saw.
    Without inputs only the parameter criterion is reported."""
    mixers = find_mixers(model)
    if not mixers:
        raise ValueError(f"token_dynamics_report: {type(model).__name__} has no Mamba mixer (zoo.core.Mamba / BiMamba)")
    seen: Dict[str, torch.Tensor] = {}
    handles = []
    if inputs:
        for name, m in mixers:
            # Mixers that get packed input (cu_seqlens) see one flat batch: scores are per packed token.
            handles.append(m.register_forward_pre_hook(lambda mod, args, _n=name: seen.setdefault(_n, args[0].detach())))
        was_training = model.training
        model.eval()
        try:
            model(*inputs, **kwargs)
        finally:
            model.train(was_training)
            for h in handles:
                h.remove()
    empty = [n for n, x in seen.items() if x.numel() == 0]
    if empty:
        raise ValueError(f"token_dynamics_report: expected inputs with at least one sample and one token, but mixer "
                         f"{empty[0]} saw input of shape {tuple(seen[empty[0]].shape)} (no token to score)")
    reports = []
    for name, m in mixers:
        for suffix in m._suffixes():
            mats = direction_matrices(m, suffix)
            eig = io_eigenvalues(mats["S_B"], mats["S_C"])
            tol = 1e-6 * max(float(eig.abs().max()), 1e-30)
            reports.append(DirectionReport(
                layer=name, direction="backward" if suffix else "forward", scenario=classify(eig),
                positive=int((eig.real > tol).sum()), negative=int((eig.real < -tol).sum()),
                max_real=float(eig.real.max()), min_real=float(eig.real.min()),
                importance=importance_scores(m, seen[name], suffix) if name in seen else None,
            ))
    return reports


def format_report(reports: Sequence[DirectionReport]) -> str:
    """A fixed-width table, one row per mixer direction."""
    rows = [("layer", "dir", "scenario", "eig+", "eig-", "max Re", "min Re", "imp mean", "imp std", "top tokens")]
    for r in reports:
        s = r.summary()
        imp = ("-", "-", "-") if r.importance is None else (
            f"{s['importance_mean']:.3f}", f"{s['importance_std']:.3f}", ",".join(map(str, s["top_tokens"])))
        rows.append((r.layer, r.direction[:3], r.scenario, str(r.positive), str(r.negative),
                     f"{r.max_real:.3g}", f"{r.min_real:.3g}", *imp))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    counts = {s: sum(r.scenario == s for r in reports) for s in SCENARIOS}
    lines.append(f"{len(reports)} directions: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v))
    return "\n".join(lines)


def enable_refinements(model: nn.Module, bc_sign: Optional[str] = None, reorder_tokens: Union[bool, str] = False) -> nn.Module:
    """Switch the refinements on in every mixer of ``model`` (in place; new parameters are created
    on the mixers' device). Returns the model."""
    for _, m in find_mixers(model):
        m.enable_refinements(bc_sign, reorder_tokens)
    return model
