"""Shapes2D: a semantic segmentation set generated offline (no download).

Each image has a background (random colour, a linear gradient of random direction and strength) with 1 to
``max_shapes`` shapes painted over it in order (later ones occlude earlier ones): circles, axis-aligned
rectangles and triangles, each of random size, position and colour, then Gaussian pixel noise. The mask
holds the class of the shape painted last at each pixel (0 background, 1 circle, 2 rectangle, 3 triangle).
Colours are drawn independently of the class, so the class must be read from the shape, not the colour.
The same seed always gives the same set; train and validation come from different seeds.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch.utils.data import Dataset

CLASSES = ("background", "circle", "rectangle", "triangle")


def _circle(g: torch.Generator, ys: torch.Tensor, xs: torch.Tensor, size: int) -> torch.Tensor:
    r = size * (0.08 + 0.17 * torch.rand((), generator=g))
    cy, cx = size * torch.rand(2, generator=g)
    return (ys - cy) ** 2 + (xs - cx) ** 2 <= r**2


def _rectangle(g: torch.Generator, ys: torch.Tensor, xs: torch.Tensor, size: int) -> torch.Tensor:
    h, w = size * (0.15 + 0.35 * torch.rand(2, generator=g))
    y0, x0 = (size - h) * torch.rand((), generator=g), (size - w) * torch.rand((), generator=g)
    return (ys >= y0) & (ys <= y0 + h) & (xs >= x0) & (xs <= x0 + w)


def _triangle(g: torch.Generator, ys: torch.Tensor, xs: torch.Tensor, size: int) -> torch.Tensor:
    # Three vertices around a random centre; a pixel is inside when the three edge functions share a sign.
    centre = size * (0.2 + 0.6 * torch.rand(2, generator=g))
    radius = size * (0.15 + 0.2 * torch.rand((), generator=g))
    angles = torch.rand((), generator=g) * 6.2832 + torch.tensor([0.0, 2.0944, 4.1888]) + 0.5 * torch.randn(3, generator=g)
    vy, vx = centre[0] + radius * torch.sin(angles), centre[1] + radius * torch.cos(angles)
    edges = [(xs - vx[i]) * (vy[(i + 1) % 3] - vy[i]) - (ys - vy[i]) * (vx[(i + 1) % 3] - vx[i]) for i in range(3)]
    return ((edges[0] >= 0) & (edges[1] >= 0) & (edges[2] >= 0)) | ((edges[0] <= 0) & (edges[1] <= 0) & (edges[2] <= 0))


_PAINTERS = (_circle, _rectangle, _triangle)


def make_shapes2d(
    num: int, size: int = 64, max_shapes: int = 4, noise: float = 0.05, seed: int = 0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``num`` images (num, 3, size, size) float32 in about [0, 1] and their masks (num, size, size) int64."""
    if num < 1 or size < 8 or max_shapes < 1:
        raise ValueError(f"make_shapes2d: expected num >= 1, size >= 8, max_shapes >= 1; got {num}, {size}, {max_shapes}")
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    images = torch.empty(num, 3, size, size)
    masks = torch.zeros(num, size, size, dtype=torch.long)
    for n in range(num):
        angle = torch.rand((), generator=g) * 6.2832
        ramp = (ys * torch.sin(angle) + xs * torch.cos(angle)) / size - 0.5
        strength = 0.4 * torch.rand(3, 1, 1, generator=g)
        images[n] = torch.rand(3, 1, 1, generator=g) + strength * ramp
        for _ in range(int(torch.randint(1, max_shapes + 1, (), generator=g))):
            cls = int(torch.randint(len(_PAINTERS), (), generator=g))
            inside = _PAINTERS[cls](g, ys, xs, size)
            images[n][:, inside] = torch.rand(3, 1, generator=g)
            masks[n][inside] = cls + 1
    images += noise * torch.randn(images.shape, generator=g)
    return images.clamp_(0, 1), masks


class Shapes2D(Dataset):
    """(image normalised to mean 0.5 / std 0.25 per channel, mask) pairs of ``make_shapes2d``."""

    classes = CLASSES
    num_classes = len(CLASSES)

    def __init__(self, num: int, size: int = 64, max_shapes: int = 4, noise: float = 0.05, seed: int = 0):
        images, self.masks = make_shapes2d(num, size, max_shapes, noise, seed)
        self.images = (images - 0.5) / 0.25

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, i: int):
        return self.images[i], self.masks[i]
