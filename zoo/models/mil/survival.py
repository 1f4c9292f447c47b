"""Discrete-time survival for MIL heads: hazards per time bin, the NLL survival loss of
Zadeh & Schmid (used by CLAM/PORPOISE/MambaMIL code), and Harrell's concordance index.

Conventions (as in MambaMIL's code): ``y`` is the index of the time bin of the event or of the
last follow-up (0..K-1), ``c`` is the censorship flag (1 = censored, 0 = event observed), and the
risk score of a slide is -sum_k S_k (higher = dies earlier).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


def hazards_and_survival(logits: torch.Tensor):
    """logits (b, K) -> hazards h_k = sigmoid(logit_k), survival S_k = prod_{j<=k} (1 - h_j)."""
    hazards = torch.sigmoid(logits)
    return hazards, torch.cumprod(1 - hazards, dim=1)


def risk_score(survival: torch.Tensor) -> torch.Tensor:
    """(b, K) survival curve -> (b,) risk: minus the expected number of bins survived."""
    return -survival.sum(dim=1)


def nll_survival_loss(hazards, survival, y, c, alpha: float = 0.0, eps: float = 1e-7) -> torch.Tensor:
    """Mean negative log-likelihood of the discrete-time survival model.

    Uncensored (event in bin y): -log S_{y-1} - log h_y, with S_{-1} = 1.
    Censored (alive through bin y): -log S_y.
    ``alpha`` adds weight on the uncensored term: (1 - alpha) * nll + alpha * uncensored.
    """
    if hazards.dim() != 2 or survival.shape != hazards.shape:
        raise ValueError(
            f"nll_survival_loss: hazards and survival must both be (batch, bins), got {tuple(hazards.shape)} and {tuple(survival.shape)}"
        )
    b, k = hazards.shape
    y = torch.as_tensor(y, device=hazards.device).long().reshape(b, 1)
    c = torch.as_tensor(c, device=hazards.device).to(hazards.dtype).reshape(b, 1)
    if bool(((y < 0) | (y >= k)).any()):
        raise ValueError(f"nll_survival_loss: time-bin labels must lie in [0, {k - 1}], got {y.flatten().tolist()[:16]}")
    s_before = torch.cat([torch.ones_like(c), survival], dim=1)  # s_before[:, j] = S_{j-1}
    log = lambda t: torch.log(t.clamp(min=eps))  # noqa: E731
    uncensored = -(1 - c) * (log(s_before.gather(1, y)) + log(hazards.gather(1, y)))
    censored = -c * log(s_before.gather(1, y + 1))
    return ((1 - alpha) * (censored + uncensored) + alpha * uncensored).mean()


class NLLSurvLoss(nn.Module):
    """``nll_survival_loss`` on logits: loss(logits (b, K), y (b,), c (b,))."""

    def __init__(self, alpha: float = 0.0, eps: float = 1e-7):
        super().__init__()
        self.alpha, self.eps = alpha, eps

    def forward(self, logits, y, c):
        hazards, survival = hazards_and_survival(logits)
        return nll_survival_loss(hazards, survival, y, c, alpha=self.alpha, eps=self.eps)


def concordance_index(event_times, risks, censorship=None, tied_tol: float = 1e-8) -> float:
    """Harrell's C: among comparable pairs, the fraction where the subject that died first has
    the higher risk (ties in risk count 1/2).

    A pair (i, j) is comparable when i had the event and t_i < t_j, or t_i == t_j and j is
    censored (the definition of scikit-survival's ``concordance_index_censored``).
    ``censorship``: 1 = censored (MambaMIL's convention); None means every event was observed.
    """
    t = np.asarray(event_times, dtype=np.float64).ravel()
    r = np.asarray(risks, dtype=np.float64).ravel()
    cens = np.zeros_like(t, dtype=bool) if censorship is None else np.asarray(censorship).ravel().astype(bool)
    if not (t.shape == r.shape == cens.shape):
        raise ValueError(f"concordance_index: event_times, risks, censorship must have equal lengths, got {t.size}, {r.size}, {cens.size}")
    event = ~cens
    # Pairwise (i, j) matrices; O(n^2) memory is fine for cohort sizes (thousands of patients).
    comparable = event[:, None] & ((t[:, None] < t[None, :]) | ((t[:, None] == t[None, :]) & cens[None, :]))
    diff = r[:, None] - r[None, :]
    tied = np.abs(diff) <= tied_tol
    n = comparable.sum()
    if n == 0:
        raise ValueError("concordance_index: no comparable pairs (need at least one observed event before another time)")
    return float(((comparable & (diff > 0) & ~tied).sum() + 0.5 * (comparable & tied).sum()) / n)
