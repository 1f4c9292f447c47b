"""Stochastic layer-wise token shuffle (Huang et al., "Stochastic Layer-Wise Shuffle for Improving Vision Mamba
Training", ICML 2025; ShuffleMamba): a training-only regulariser for stacked scan blocks. Block i of a stack of
depth L runs, with probability rate * i / (L - 1), on its tokens in one random order (shared by the batch, as
the official code draws it) and its outputs are put back in the original order. No parameters; off in eval.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch

from .checks import check_float


def _random_order(length: int, device: torch.device, cu_seqlens: Optional[torch.Tensor]) -> torch.Tensor:
    if cu_seqlens is None:
        return torch.randperm(length, device=device)
    # a random key in [s, s + 1) for every token of sequence s: sorting keeps sequences in place
    sequence = torch.repeat_interleave(torch.arange(cu_seqlens.numel() - 1, device=device), cu_seqlens.diff().to(device))
    return torch.argsort(sequence.double() + torch.rand(length, device=device, dtype=torch.float64))


def layer_shuffle_rates(depth: int, rate: float) -> List[float]:
    """Per-block shuffle probabilities, 0 at the first block rising linearly to ``rate`` at the last."""
    check_float("layer_shuffle", rate, 0.0, 1.0)
    return torch.linspace(0, rate, depth, device="cpu").tolist()


def shuffled(fn: Callable, *tokens: Optional[torch.Tensor], prob: float, training: bool,
             cu_seqlens: Optional[torch.Tensor] = None):
    """``fn(*tokens)``, with probability ``prob`` in training on the tokens (axis 1; None passes through) in one
    random order, its output(s) restored to the original order. With ``cu_seqlens`` (packed sequences along
    axis 1) each sequence's tokens are shuffled among themselves, so the packing stays valid."""
    if not training or prob <= 0.0 or torch.rand(()).item() >= prob:
        return fn(*tokens)
    first = next(t for t in tokens if t is not None)
    order = _random_order(first.shape[1], first.device, cu_seqlens)
    back = torch.argsort(order)
    out = fn(*(None if t is None else t[:, order] for t in tokens))
    if isinstance(out, tuple):
        return tuple(None if o is None else o[:, back] for o in out)
    return out[:, back]
