"""The per-step transition of the scans: exp(dt * A) in (0, 1), or with negative eigenvalues
2 * exp(dt * A) - 1 in (-1, 1) (Grazzi et al., "Unlocking State-Tracking in Linear RNNs Through Negative
Eigenvalues", ICLR 2025: the change they make to Mamba's transition; the input term dt * B * x stays)."""
from __future__ import annotations

import torch


def decay(dtA: torch.Tensor, negative_eigenvalues: bool = False) -> torch.Tensor:
    a = torch.exp(dtA)
    return 2 * a - 1 if negative_eigenvalues else a


def decay_grad(a: torch.Tensor, negative_eigenvalues: bool = False) -> torch.Tensor:
    """d decay / d (dt A), given a = decay(dt A): exp(dt A) itself, or 2 exp(dt A) = a + 1."""
    return a + 1 if negative_eigenvalues else a
