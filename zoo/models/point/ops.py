"""Grouping ops for point clouds in plain torch (CPU or GPU, no compiled extensions).

Batches are padded (B, N, 3) with optional ``lengths`` (B,) giving each cloud's real point count;
packed clouds in torch_geometric's layout (all points stacked, with ``ptr`` offsets or a ``batch``
vector) convert with :func:`packed_to_padded` / :func:`from_pyg` and back with
:func:`padded_to_packed`. Distance matrices are built a chunk of queries at a time, so memory is
bounded by ``max_elements`` rather than by queries x points (100k x 100k fits).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from zoo.core.precision import upcast

from .serialization import _valid_mask, check_points

DEFAULT_MAX_ELEMENTS = 1 << 24  # float32 distance entries per chunk (64 MiB)


def farthest_point_sample(
    xyz: torch.Tensor, num_samples: int, lengths: Optional[torch.Tensor] = None, start: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Indices (B, num_samples) of iterative farthest points; the first is ``start`` (default
    index 0, as in pointnet2_ops' CUDA kernel that PointMamba uses).

    Loops over samples, vectorised over clouds and points: O(num_samples * N) time, O(B * N) memory.
    """
    check_points(xyz, lengths, "farthest_point_sample", min_points=num_samples)
    if num_samples < 1:
        raise ValueError(f"farthest_point_sample: num_samples must be >= 1, got {num_samples}")
    b, n, _ = xyz.shape
    valid = _valid_mask(xyz, lengths)
    # Distances in float32 as pointnet2_ops' CUDA kernel (float64 clouds in float64).
    pts = upcast(xyz.detach())
    # Padded points start at -1 so they never win the argmax.
    min_d = torch.where(valid, pts.new_full((b, n), float("inf")), pts.new_full((b, n), -1.0))
    idx = torch.empty(b, num_samples, dtype=torch.long, device=xyz.device)
    cur = torch.zeros(b, dtype=torch.long, device=xyz.device) if start is None else start.to(xyz.device).long()
    rows = torch.arange(b, device=xyz.device)
    for i in range(num_samples):
        idx[:, i] = cur
        d = (pts - pts[rows, cur][:, None]).square().sum(-1)
        min_d = torch.minimum(min_d, torch.where(valid, d, min_d))
        cur = min_d.argmax(dim=1)
    return idx


def knn(
    query: torch.Tensor,
    points: torch.Tensor,
    k: int,
    query_lengths: Optional[torch.Tensor] = None,
    points_lengths: Optional[torch.Tensor] = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """k nearest ``points`` (B, N, 3) of each ``query`` (B, M, 3): (squared distances, indices),
    both (B, M, k), nearest first. Padded queries get index 0 and distance 0."""
    check_points(points, points_lengths, "knn (points)", min_points=k)
    check_points(query, query_lengths, "knn (query)", min_points=0)
    if k < 1:
        raise ValueError(f"knn: k must be >= 1, got {k}")
    if query.shape[0] != points.shape[0]:
        raise ValueError(f"knn: query and points need the same batch size, got {query.shape[0]} and {points.shape[0]}")
    b, m, _ = query.shape
    n = points.shape[1]
    valid_p = _valid_mask(points, points_lengths)
    chunk = max(1, max_elements // max(1, b * n))
    dists, idxs = [], []
    for s in range(0, m, chunk):
        q = query[:, s : s + chunk]
        # Exact differences (|q|^2 + |p|^2 - 2qp cancels badly for near points), one axis at a time.
        d = sum((q[:, :, None, a] - points[:, None, :, a]).square() for a in range(3))
        d = d.masked_fill(~valid_p[:, None, :], float("inf"))
        dist, ind = torch.topk(d, k, dim=-1, largest=False, sorted=True)
        dists.append(dist)
        idxs.append(ind)
    if m == 0:
        return query.new_zeros(b, 0, k), torch.zeros(b, 0, k, dtype=torch.long, device=query.device)
    dist, ind = torch.cat(dists, 1), torch.cat(idxs, 1)
    if query_lengths is not None:
        pad = ~_valid_mask(query, query_lengths)[..., None]
        dist, ind = dist.masked_fill(pad, 0.0), ind.masked_fill(pad, 0)
    return dist, ind


def group_points(
    xyz: torch.Tensor, num_groups: int, group_size: int, lengths: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PointMamba / Point-MAE patches: FPS centres, then each centre's ``group_size`` nearest points.

    Returns (neighbourhoods (B, G, K, 3) relative to their centre, centres (B, G, 3), point indices
    (B, G, K)).
    """
    check_points(xyz, lengths, "group_points", min_points=max(num_groups, group_size))
    center_idx = farthest_point_sample(xyz, num_groups, lengths)
    centers = xyz.gather(1, center_idx[..., None].expand(-1, -1, 3))
    _, idx = knn(centers, xyz, group_size, points_lengths=lengths)
    b, g, k = idx.shape
    neigh = xyz.gather(1, idx.reshape(b, g * k, 1).expand(-1, -1, 3)).reshape(b, g, k, 3)
    return neigh - centers[:, :, None], centers, idx


def packed_to_padded(
    pos: torch.Tensor, ptr: Optional[torch.Tensor] = None, batch: Optional[torch.Tensor] = None, fill: float = 0.0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Packed points (P, C) with CSR offsets ``ptr`` (B+1,) or a sorted ``batch`` vector (P,) ->
    (padded (B, N_max, C), lengths (B,))."""
    if pos.dim() != 2:
        raise ValueError(f"packed_to_padded: expected packed points of shape (num_points, channels), got {tuple(pos.shape)}")
    if ptr is None:
        if batch is None:
            raise ValueError("packed_to_padded: give ptr (CSR offsets) or batch (cloud index per point)")
        if batch.shape != pos.shape[:1]:
            raise ValueError(f"packed_to_padded: expected batch of shape ({pos.shape[0]},), got {tuple(batch.shape)}")
        if batch.numel() and bool((batch[1:] < batch[:-1]).any()):
            raise ValueError("packed_to_padded: batch must be sorted (points of a cloud contiguous), as in torch_geometric")
        counts = torch.bincount(batch.long()) if batch.numel() else batch.new_zeros(0)
        ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    ptr = ptr.long().to(pos.device)
    if ptr.dim() != 1 or ptr.numel() < 1 or int(ptr[0]) != 0 or int(ptr[-1]) != pos.shape[0]:
        raise ValueError(f"packed_to_padded: ptr must run from 0 to the number of points {pos.shape[0]}, got {ptr.tolist()[:8]}")
    lengths = ptr[1:] - ptr[:-1]
    if bool((lengths < 0).any()):
        raise ValueError(f"packed_to_padded: ptr must be non-decreasing, got {ptr.tolist()[:8]}")
    b = lengths.numel()
    n_max = int(lengths.max()) if b else 0
    out = pos.new_full((b, n_max, pos.shape[1]), fill)
    cloud = torch.repeat_interleave(torch.arange(b, device=pos.device), lengths)
    slot = torch.arange(pos.shape[0], device=pos.device) - ptr[:-1][cloud]
    out[cloud, slot] = pos
    return out, lengths


def padded_to_packed(x: torch.Tensor, lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(B, N, C) with lengths (B,) -> (packed (P, C), ptr (B+1,)): the inverse of packed_to_padded."""
    valid = _valid_mask(x, lengths)
    ptr = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).long()
    return x[valid], ptr


def from_pyg(data) -> Tuple[torch.Tensor, torch.Tensor]:
    """torch_geometric ``Data`` or ``Batch`` (anything with ``pos`` and ``ptr``/``batch``) ->
    (padded xyz (B, N_max, 3), lengths (B,)). A single ``Data`` without either is one cloud."""
    pos = getattr(data, "pos", None)
    if pos is None:
        raise ValueError(f"from_pyg: expected a torch_geometric Data/Batch with a 'pos' attribute, got {type(data).__name__}")
    ptr = getattr(data, "ptr", None)
    batch = getattr(data, "batch", None)
    if ptr is None and batch is None:
        ptr = torch.tensor([0, pos.shape[0]], device=pos.device)
    return packed_to_padded(pos, ptr=ptr, batch=batch)


def check_head_batch(model: str, head: torch.nn.Module, x: torch.Tensor) -> None:
    """The official heads (PointMamba's and PCM's classification MLPs, PointMamba part segmentation's object-label
    embedding) keep BatchNorm1d over one value per sample, as their checkpoints do; BatchNorm cannot compute batch
    statistics of one sample, so a training-mode forward of a batch of 1 through such a head is an error, said
    here in those words (train with batches of 2 or more, or put the head in eval mode to use its running
    statistics)."""
    if head.training and x.shape[0] == 1 and any(isinstance(m, torch.nn.BatchNorm1d) for m in head.modules()):
        raise ValueError(
            f"{model}: the head has BatchNorm layers (the official layout), which cannot train on a "
            f"batch of 1 sample; got pooled features of shape {tuple(x.shape)}: train with a batch of 2 or more, "
            "or call .eval() on the head to use its running statistics"
        )
