"""Point-cloud serialization: space-filling-curve orders over quantised coordinates.

A cloud is quantised to a grid (``floor(xyz / grid_size)``, shifted so each cloud's minimum cell is
0), every cell gets an integer code along a curve, and sorting the codes gives the order in which a
sequence model reads the points. Curves:

- ``"hilbert"``: Skilling's Hilbert curve (Skilling 2004, "Programming the Hilbert curve"); x is
  the most significant axis of each level, the convention of Pointcept and PointMamba, so orders
  match theirs. ``"hilbert-trans"`` swaps x and y first (PointMamba's second order).
- ``"z"`` / ``"z-trans"``: Morton (z-order) codes, bits interleaved x, y, z from the top.
- ``"xyz"``, ``"xzy"``, ``"yxz"``, ``"yzx"``, ``"zxy"``, ``"zyx"``: Point Cloud Mamba's consistent
  traverse serialization (CTS): a boustrophedon ("snake") scan where the first named axis varies
  fastest and reverses direction on every step of the second, which reverses on every step of the
  third, so consecutive cells are always grid neighbours.

Everything is vectorised over points; the only Python loops run over bits (at most 21) and axes.
Codes are int64; padded points (beyond ``lengths``) sort to the end of their cloud.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

HILBERT_ORDERS = ("hilbert", "hilbert-trans")
Z_ORDERS = ("z", "z-trans")
CTS_ORDERS = ("xyz", "xzy", "yxz", "yzx", "zxy", "zyx")
ORDERS = HILBERT_ORDERS + Z_ORDERS + CTS_ORDERS

MAX_DEPTH = 21  # 3 * 21 = 63 bits: the largest code that fits a non-negative int64

_AXIS = {"x": 0, "y": 1, "z": 2}


def _check_grid(grid: torch.Tensor, name: str) -> None:
    if grid.shape[-1:] != (3,):
        raise ValueError(f"{name}: expected grid coordinates of shape (..., 3), got {tuple(grid.shape)}")
    if grid.dtype.is_floating_point or grid.dtype == torch.bool:
        raise TypeError(f"{name}: expected integer grid coordinates, got dtype {grid.dtype}")


def bit_length(x: torch.Tensor) -> torch.Tensor:
    """Elementwise number of bits needed for non-negative integers (0 -> 0), like int.bit_length."""
    x = x.long()
    out = torch.zeros_like(x)
    for k in range(MAX_DEPTH + 1):
        out += (x >= (1 << k)).long()
    return out


def hilbert_encode(grid: torch.Tensor, depth: Union[int, torch.Tensor]) -> torch.Tensor:
    """Hilbert index of integer cells (..., 3) in a cube of side 2**depth -> (...) int64.

    ``depth`` may be a tensor broadcastable to grid.shape[:-1] (one depth per cloud): the curve of
    a smaller cube is a different curve, not a corner of a bigger one, so each cloud keeps its own.
    """
    _check_grid(grid, "hilbert_encode")
    if isinstance(depth, int):
        max_depth, depth_t = depth, torch.tensor(depth, device=grid.device)
    elif torch.compiler.is_compiling():
        # The loops run to the largest depth, and the bits at or above an element's own depth are skipped, so any
        # larger bound gives the same codes: under torch.compile it is MAX_DEPTH, as a loop count cannot be read
        # from a tensor inside the graph.
        depth_t, max_depth = depth.long(), MAX_DEPTH
        torch._assert_async((depth_t <= MAX_DEPTH).all(), f"hilbert_encode: depth must be <= {MAX_DEPTH} (63-bit codes)")
    else:
        depth_t = depth.long()
        max_depth = int(depth_t.max()) if depth_t.numel() else 0
    if max_depth > MAX_DEPTH:
        raise ValueError(f"hilbert_encode: depth must be <= {MAX_DEPTH} (63-bit codes), got {max_depth}")
    x = [grid[..., i].long() for i in range(3)]
    # Skilling's AxesToTranspose, step 1: undo the rotations/reflections from the top bit down;
    # bits at or above an element's own depth are skipped (its curve has no such level).
    for b in range(max_depth - 1, 0, -1):
        q, p = 1 << b, (1 << b) - 1
        active = b < depth_t
        for i in range(3):
            bit_set = (x[i] & q) != 0
            t = torch.where(~bit_set & active, (x[0] ^ x[i]) & p, 0)  # exchange low bits of x0 and xi
            x[0] = torch.where(bit_set & active, x[0] ^ p, x[0] ^ t)  # or invert low bits of x0
            x[i] = x[i] ^ t if i else x[0]
    # Step 2: Gray encode.
    x[1] = x[1] ^ x[0]
    x[2] = x[2] ^ x[1]
    t = torch.zeros_like(x[0])
    for b in range(max_depth - 1, 0, -1):
        t = torch.where((x[2] >> b) & 1 == 1, t ^ ((1 << b) - 1), t)
    return _interleave([xi ^ t for xi in x], max_depth)


def hilbert_decode(code: torch.Tensor, depth: int) -> torch.Tensor:
    """Inverse of :func:`hilbert_encode` for one depth: codes (...) -> cells (..., 3) int64."""
    if not 0 <= depth <= MAX_DEPTH:
        raise ValueError(f"hilbert_decode: depth must be in [0, {MAX_DEPTH}], got {depth}")
    x = _deinterleave(code.long(), depth)
    # Skilling's TransposeToAxes: Gray decode, then redo the rotations from the bottom bit up.
    t = x[2] >> 1
    x[2] = x[2] ^ x[1]
    x[1] = x[1] ^ x[0]
    x[0] = x[0] ^ t
    for b in range(1, depth):
        q, p = 1 << b, (1 << b) - 1
        for i in (2, 1, 0):
            bit_set = (x[i] & q) != 0
            t = torch.where(bit_set, 0, (x[0] ^ x[i]) & p)
            x[0] = torch.where(bit_set, x[0] ^ p, x[0] ^ t)
            x[i] = x[i] ^ t if i else x[0]
    return torch.stack(x, dim=-1)


def _interleave(x, depth: int) -> torch.Tensor:
    # Bit b of axis i goes to 3*b + (2 - i): x is the most significant axis of each level.
    code = torch.zeros_like(x[0])
    for b in range(depth):
        for i in range(3):
            code |= ((x[i] >> b) & 1) << (3 * b + 2 - i)
    return code


def _deinterleave(code: torch.Tensor, depth: int):
    x = [torch.zeros_like(code) for _ in range(3)]
    for b in range(depth):
        for i in range(3):
            x[i] |= ((code >> (3 * b + 2 - i)) & 1) << b
    return x


def z_order_encode(grid: torch.Tensor) -> torch.Tensor:
    """Morton code of integer cells (..., 3) (x most significant per level) -> (...) int64."""
    _check_grid(grid, "z_order_encode")
    x = [grid[..., i].long() for i in range(3)]
    depth = int(bit_length(grid.max()).item()) if grid.numel() else 0
    if depth > MAX_DEPTH:
        raise ValueError(f"z_order_encode: coordinates need {depth} bits, at most {MAX_DEPTH} fit a 63-bit code")
    return _interleave(x, depth)


def cts_encode(grid: torch.Tensor, axes: str = "xyz", extent: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Consistent traverse (snake) code of integer cells (..., 3) -> (...) int64.

    ``axes[0]`` varies fastest. ``extent`` (..., 3): number of cells per axis (default: one more
    than the largest coordinate over all of ``grid``); codes are dense in [0, prod(extent)).
    """
    _check_grid(grid, "cts_encode")
    if axes not in CTS_ORDERS:
        raise ValueError(f"cts_encode: axes must be one of {CTS_ORDERS}, got {axes!r}")
    g = grid.long()
    if extent is None:
        extent = (g.reshape(-1, 3).amax(0) + 1) if g.numel() else torch.ones(3, dtype=torch.long, device=g.device)
    ia, ib, ic = (_AXIS[c] for c in axes)
    a, b, c = g[..., ia], g[..., ib], g[..., ic]
    na, nb = extent[..., ia], extent[..., ib]
    # Reverse the fast axis on odd rows, then the whole (row, column) plane on odd layers.
    a = torch.where(b % 2 == 1, na - 1 - a, a)
    plane = b * na + a
    plane = torch.where(c % 2 == 1, na * nb - 1 - plane, plane)
    return c * (na * nb) + plane


def quantize(xyz: torch.Tensor, grid_size: float, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, N, 3) float -> (B, N, 3) int64 cells, each cloud shifted so its smallest cell is 0 on
    every axis (padded points beyond ``lengths`` are ignored for the minimum and set to 0)."""
    check_points(xyz, lengths, "quantize")
    if grid_size <= 0:
        raise ValueError(f"quantize: grid_size must be positive, got {grid_size}")
    cell = torch.floor(xyz / grid_size).long()
    valid = _valid_mask(xyz, lengths)
    big = torch.iinfo(torch.long).max
    lo = torch.where(valid[..., None], cell, torch.full_like(cell, big)).amin(dim=1, keepdim=True)
    return torch.where(valid[..., None], cell - lo, torch.zeros_like(cell))


def _valid_mask(xyz: torch.Tensor, lengths: Optional[torch.Tensor]) -> torch.Tensor:
    b, n = xyz.shape[:2]
    if lengths is None:
        return torch.ones(b, n, dtype=torch.bool, device=xyz.device)
    return torch.arange(n, device=xyz.device)[None, :] < lengths.to(xyz.device)[:, None]


def check_points(xyz: torch.Tensor, lengths: Optional[torch.Tensor], name: str, min_points: int = 1) -> None:
    """Shape, dtype, finiteness and point-count checks shared by the point ops and models."""
    if not isinstance(xyz, torch.Tensor) or xyz.dim() != 3 or xyz.shape[-1] != 3:
        shape = tuple(xyz.shape) if isinstance(xyz, torch.Tensor) else type(xyz).__name__
        raise ValueError(f"{name}: expected points of shape (batch, num_points, 3), got {shape}")
    if not xyz.dtype.is_floating_point:
        raise TypeError(f"{name}: expected floating-point coordinates, got dtype {xyz.dtype}")
    b, n = xyz.shape[:2]
    if lengths is not None and lengths.shape != (b,):
        raise ValueError(f"{name}: expected lengths of shape ({b},), got {tuple(lengths.shape)}")
    if torch.compiler.is_compiling():
        _assert_points_in_graph(xyz, lengths, name, min_points)
        return
    if lengths is not None:
        if b and (int(lengths.min()) < 0 or int(lengths.max()) > n):
            raise ValueError(f"{name}: lengths must lie in [0, {n}], got min {int(lengths.min())}, max {int(lengths.max())}")
    counts = lengths if lengths is not None else torch.full((b,), n, device=xyz.device)
    if b and int(counts.min()) < min_points:
        i = int(counts.argmin())
        raise ValueError(f"{name}: expected at least {min_points} point(s) per cloud, got {int(counts[i])} in cloud {i}")
    valid = _valid_mask(xyz, lengths)
    bad = ~torch.isfinite(xyz).all(-1) & valid
    if bool(bad.any()):
        i, j = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"{name}: expected finite coordinates, got {xyz[i, j].tolist()} at cloud {i}, point {j} "
                         f"({int(bad.sum())} non-finite point(s) in all)")


def _assert_points_in_graph(xyz: torch.Tensor, lengths: Optional[torch.Tensor], name: str, min_points: int) -> None:
    """check_points' value checks under torch.compile: the eager ones read values to the host to word their message
    (a data-dependent graph break), so here the same conditions are asserted inside the graph (RuntimeError)."""
    b, n = xyz.shape[:2]
    if not b:
        return
    counts = lengths if lengths is not None else torch.full((b,), n, device=xyz.device)
    torch._assert_async(((counts >= min_points) & (counts <= n)).all(),
                        f"{name}: expected lengths in [{min_points}, {n}] (at least {min_points} point(s) per cloud)")
    bad = ~torch.isfinite(xyz).all(-1) & _valid_mask(xyz, lengths)
    torch._assert_async(~bad.any(), f"{name}: expected finite coordinates")


def serialization_codes(
    xyz: torch.Tensor,
    order: str = "hilbert",
    grid_size: float = 0.02,
    lengths: Optional[torch.Tensor] = None,
    depth: Optional[int] = None,
    cts_variant: str = "snake",
) -> torch.Tensor:
    """Codes (B, N) int64 of each point along ``order``; padded points get the int64 maximum.

    ``depth`` (Hilbert only): side 2**depth of the curve's cube; default per cloud, the bit length
    of its largest cell coordinate (Pointcept/PointMamba take the largest over the whole batch,
    which makes a cloud's order depend on its batch-mates; the two agree whenever the clouds of a
    batch span the same power of two).

    ``cts_variant`` (CTS orders only): ``"snake"``, the traversal of the PCM paper, or
    ``"official"``, what the released PCM code computes: its ``encode_cts`` multiplies by the axis
    maxima where the coordinates are meant, so the order is the first named axis alone, descending
    when exactly one of the other two axes' largest cell index is odd (taken per cloud here, over
    the batch there).
    """
    if order not in ORDERS:
        raise ValueError(f"serialization: unknown order {order!r}; expected one of {ORDERS}")
    if cts_variant not in ("snake", "official"):
        raise ValueError(f"serialization: cts_variant must be 'snake' or 'official', got {cts_variant!r}")
    grid = quantize(xyz, grid_size, lengths)
    valid = _valid_mask(xyz, lengths)
    if order.endswith("-trans"):
        grid = grid[..., [1, 0, 2]]
    if order in HILBERT_ORDERS:
        if depth is None:
            d = bit_length(grid.amax(dim=(1, 2)))[:, None]  # (B, 1): one curve per cloud
        else:
            d = int(depth)
            need = int(bit_length(grid.max()).item()) if grid.numel() else 0
            if need > d:
                raise ValueError(f"serialization: depth {d} covers 2**{d} cells per axis, the cloud needs depth {need}")
        too_big = f"serialization: the clouds span more than 2**{MAX_DEPTH} cells per axis; use a larger grid_size"
        if isinstance(d, torch.Tensor) and torch.compiler.is_compiling():  # the check inside the graph
            torch._assert_async((d <= MAX_DEPTH).all(), too_big)
        elif (d if isinstance(d, int) else int(d.max()) if d.numel() else 0) > MAX_DEPTH:
            raise ValueError(too_big)
        code = hilbert_encode(grid, d)
    elif order in Z_ORDERS:
        code = z_order_encode(grid)
    else:
        # Per-cloud extents so one cloud's code does not depend on its batch-mates.
        extent = torch.where(valid[..., None], grid, torch.zeros_like(grid)).amax(dim=1, keepdim=True) + 1
        if cts_variant == "snake":
            code = cts_encode(grid, order, extent)
        else:
            a, b, c = (_AXIS[ch] for ch in order)
            flip = ((extent[..., b] - 1) % 2) != ((extent[..., c] - 1) % 2)
            code = torch.where(flip, -grid[..., a], grid[..., a])
    return torch.where(valid, code, torch.full_like(code, torch.iinfo(torch.long).max))


def serialize(
    xyz: torch.Tensor,
    order: str = "hilbert",
    grid_size: float = 0.02,
    lengths: Optional[torch.Tensor] = None,
    depth: Optional[int] = None,
    cts_variant: str = "snake",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Order of the points of each cloud along ``order``: returns (perm, inverse), both (B, N).

    ``xyz.gather(1, perm[..., None].expand(-1, -1, 3))`` is the serialized cloud, and gathering
    serialized features with ``inverse`` scatters them back. Ties (points in one cell) keep their
    input order (stable sort).
    """
    code = serialization_codes(xyz, order, grid_size, lengths, depth, cts_variant)
    perm = torch.sort(code, dim=1, stable=True).indices
    return perm, invert_permutation(perm)


def invert_permutation(perm: torch.Tensor) -> torch.Tensor:
    """Inverse of permutations along the last dimension."""
    inv = torch.empty_like(perm)
    inv.scatter_(-1, perm, torch.arange(perm.shape[-1], device=perm.device).expand_as(perm))
    return inv


def gather_points(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, N, *C) gathered along dim 1 by index (B, M) -> (B, M, *C)."""
    idx = index.reshape(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:])
    return x.gather(1, idx)
