"""Bags of instances: packing a batch of bags into one sequence, and per-bag pooling over it.

A batch of bags is carried as ``x`` (total, feat) plus ``cu_seqlens`` [0, n_1, n_1 + n_2, ...]
(int64), the layout the core's packed scan takes, so bags of any sizes run in one call.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

Bags = Union[torch.Tensor, Sequence[torch.Tensor]]


def pack_bags(bags: Bags, cu_seqlens: Optional[torch.Tensor] = None, in_dim: Optional[int] = None, who: str = "MIL"):
    """Normalise every accepted bag layout to (x (total, feat), cu_seqlens int64 (num_bags + 1,)).

    Accepted: one bag (n, feat) or (1, n, feat); equal-size bags (b, n, feat); a list of
    (n_i, feat) tensors; or a packed (total, feat) / (1, total, feat) tensor with ``cu_seqlens``.
    """
    if isinstance(bags, (list, tuple)):
        if cu_seqlens is not None:
            raise ValueError(f"{who}: pass either a list of bags or a packed tensor with cu_seqlens, not both")
        if len(bags) == 0:
            raise ValueError(f"{who}: expected at least one bag, got an empty list")
        for i, b in enumerate(bags):
            if not torch.is_tensor(b) or b.dim() != 2:
                shape = tuple(b.shape) if torch.is_tensor(b) else type(b).__name__
                raise ValueError(f"{who}: bag {i} must be a (num_instances, feat) tensor, got {shape}")
        dims = sorted({b.shape[1] for b in bags})
        if len(dims) != 1:
            raise ValueError(f"{who}: all bags must have the same feature dim, got dims {dims}")
        lens = torch.tensor([b.shape[0] for b in bags], dtype=torch.long)
        x = torch.cat(list(bags), dim=0)
        cu = torch.cat([lens.new_zeros(1), lens.cumsum(0)]).to(x.device)
    elif torch.is_tensor(bags):
        x = bags
        if x.dim() == 3 and cu_seqlens is None:  # (b, n, feat): b bags of n instances
            b, n = x.shape[:2]
            cu = torch.arange(b + 1, device=x.device, dtype=torch.long) * n
            x = x.reshape(b * n, x.shape[-1])
        elif x.dim() == 3:
            if x.shape[0] != 1:
                raise ValueError(f"{who}: packed bags (cu_seqlens) need batch 1, got shape {tuple(x.shape)}")
            x = x[0]
        elif x.dim() != 2:
            raise ValueError(f"{who}: expected a bag (n, feat), bags (b, n, feat) or a list of bags, got shape {tuple(x.shape)}")
        elif cu_seqlens is None:
            cu = torch.tensor([0, x.shape[0]], device=x.device, dtype=torch.long)
        if cu_seqlens is not None:
            cu = torch.as_tensor(cu_seqlens, device=x.device).long()
            if cu.dim() != 1 or cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != x.shape[0]:
                raise ValueError(
                    f"{who}: cu_seqlens must be [0, n_1, n_1 + n_2, ..., {x.shape[0]}] (total instances), "
                    f"got {cu.tolist() if cu.numel() <= 16 else tuple(cu.shape)}"
                )
    else:
        raise TypeError(f"{who}: expected a tensor or a list of tensors, got {type(bags).__name__}")
    lens = cu[1:] - cu[:-1]
    if torch.is_tensor(bags) and bags.dim() == 3 and cu_seqlens is None:
        if bags.shape[1] == 0:  # equal-size bags: the size is the shape's, no value is read
            raise ValueError(f"{who}: every bag needs at least one instance; got bags of shape {tuple(bags.shape)}")
    elif bool((lens <= 0).any()):
        empty = torch.nonzero(lens <= 0).flatten().tolist()
        raise ValueError(f"{who}: every bag needs at least one instance; bags {empty} are empty (sizes {lens.tolist()[:16]})")
    if in_dim is not None and x.shape[-1] != in_dim:
        raise ValueError(f"{who}: expected instance features of dim {in_dim}, got {x.shape[-1]} (input shape {tuple(x.shape)})")
    return x, cu


def bag_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(total,) index of the bag each packed instance belongs to."""
    lens = cu_seqlens[1:] - cu_seqlens[:-1]
    return torch.repeat_interleave(torch.arange(lens.numel(), device=cu_seqlens.device), lens, output_size=total)


def segment_softmax(scores: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Softmax of (total,) scores within each bag."""
    ids = bag_ids(cu_seqlens, scores.shape[0])
    num = cu_seqlens.numel() - 1
    # Subtracting the per-bag max keeps exp() finite; it cancels in the ratio.
    peak = scores.new_full((num,), float("-inf")).scatter_reduce(0, ids, scores.detach(), "amax")
    e = torch.exp(scores - peak[ids])  # float32 under CUDA autocast, whatever the scores' dtype
    return e / e.new_zeros(num).index_add(0, ids, e)[ids]


def attention_pool(scores: torch.Tensor, h: torch.Tensor, cu_seqlens: torch.Tensor):
    """Per-bag sum_i softmax(scores)_i * h_i: (total,), (total, d) -> ((num_bags, d), weights (total,))."""
    w = segment_softmax(scores, cu_seqlens)
    ids = bag_ids(cu_seqlens, h.shape[0])
    weighted = w[:, None] * h
    pooled = weighted.new_zeros(cu_seqlens.numel() - 1, h.shape[-1]).index_add(0, ids, weighted)
    return pooled, w
