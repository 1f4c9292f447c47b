"""Shapes3D: a point-cloud classification set generated offline (no download).

Five classes of surfaces, each sampled uniformly by area: sphere, box, cylinder, cone, torus.
Every sample draws its own proportions (box sides, radii, heights, torus tube), a random rotation
(uniform on SO(3)), anisotropic scale, Gaussian surface noise, and with probability
``occlusion_prob`` loses the part of the surface beyond a random plane (a one-sided scan), before
being centred and scaled into the unit sphere as ModelNet40 clouds are. The same seed always gives
the same set; train and test come from different seeds.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch

CLASSES = ("sphere", "box", "cylinder", "cone", "torus")


def _sphere(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _box(rng: np.random.Generator, n: int) -> np.ndarray:
    half = rng.uniform(0.3, 1.0, size=3)
    # Pick a face with probability proportional to its area, then a uniform point on it.
    areas = np.array([half[1] * half[2], half[0] * half[2], half[0] * half[1]]).repeat(2)
    face = rng.choice(6, size=n, p=areas / areas.sum())
    p = rng.uniform(-1, 1, size=(n, 3)) * half
    axis = face // 2
    p[np.arange(n), axis] = np.where(face % 2 == 0, -1.0, 1.0) * half[axis]
    return p


def _disk(rng: np.random.Generator, n: int, radius: float) -> np.ndarray:
    r = radius * np.sqrt(rng.uniform(size=n))
    t = rng.uniform(0, 2 * np.pi, size=n)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _cylinder(rng: np.random.Generator, n: int) -> np.ndarray:
    r, h = rng.uniform(0.3, 0.8), rng.uniform(0.8, 2.0)
    side, cap = 2 * np.pi * r * h, np.pi * r * r
    part = rng.choice(3, size=n, p=np.array([side, cap, cap]) / (side + 2 * cap))
    t = rng.uniform(0, 2 * np.pi, size=n)
    p = np.stack([r * np.cos(t), r * np.sin(t), rng.uniform(-h / 2, h / 2, size=n)], 1)
    caps = part > 0
    p[caps, :2] = _disk(rng, int(caps.sum()), r)
    p[caps, 2] = np.where(part[caps] == 1, -h / 2, h / 2)
    return p


def _cone(rng: np.random.Generator, n: int) -> np.ndarray:
    r, h = rng.uniform(0.4, 1.0), rng.uniform(0.8, 2.0)
    side, base = np.pi * r * np.hypot(r, h), np.pi * r * r
    on_side = rng.uniform(size=n) < side / (side + base)
    # Lateral area grows linearly with distance from the apex: s = sqrt(u) is uniform by area.
    s = np.sqrt(rng.uniform(size=n))
    t = rng.uniform(0, 2 * np.pi, size=n)
    p = np.stack([s * r * np.cos(t), s * r * np.sin(t), h / 2 - s * h], 1)
    nb = int((~on_side).sum())
    p[~on_side, :2] = _disk(rng, nb, r)
    p[~on_side, 2] = -h / 2
    return p


def _torus(rng: np.random.Generator, n: int) -> np.ndarray:
    big, small = rng.uniform(0.6, 1.0), rng.uniform(0.15, 0.45)
    # Area element is proportional to (R + r cos v): rejection-sample v, oversampling 3x.
    u = rng.uniform(0, 2 * np.pi, size=3 * n)
    v = rng.uniform(0, 2 * np.pi, size=3 * n)
    keep = rng.uniform(size=3 * n) < (big + small * np.cos(v)) / (big + small)
    u, v = u[keep][:n], v[keep][:n]
    ring = big + small * np.cos(v)
    return np.stack([ring * np.cos(u), ring * np.sin(u), small * np.sin(v)], 1)


_SAMPLERS = (_sphere, _box, _cylinder, _cone, _torus)


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))  # Haar-uniform orthogonal matrix
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def sample_shape(
    rng: np.random.Generator, label: int, num_points: int, noise: float = 0.01, occlusion_prob: float = 0.5,
    max_occlusion: float = 0.4,
) -> np.ndarray:
    """One cloud (num_points, 3) float32 of class ``CLASSES[label]``, normalised into the unit sphere."""
    if not 0 <= label < len(CLASSES):
        raise ValueError(f"shapes3d: label must be in [0, {len(CLASSES)}), got {label}")
    pts = _SAMPLERS[label](rng, 4 * num_points)
    pts = pts * rng.uniform(0.7, 1.3, size=3)
    pts = pts @ _rotation(rng).T
    pts = pts + rng.normal(scale=noise, size=pts.shape)
    if rng.uniform() < occlusion_prob:
        # Cut away the points beyond a random plane: up to max_occlusion of the surface.
        d = _sphere(rng, 1)[0]
        proj = pts @ d
        cut = np.quantile(proj, 1.0 - rng.uniform(0.1, max_occlusion))
        pts = pts[proj <= cut]
    pts = pts[rng.choice(len(pts), size=num_points, replace=len(pts) < num_points)]
    pts = pts - pts.mean(0)
    return (pts / np.linalg.norm(pts, axis=1).max()).astype(np.float32)


def make_shapes3d(
    num_per_class: int, num_points: int = 1024, seed: int = 0, noise: float = 0.01, occlusion_prob: float = 0.5,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(points (M, num_points, 3) float32, labels (M,) int64), M = 5 * num_per_class, shuffled."""
    if num_per_class < 1 or num_points < 1:
        raise ValueError(f"shapes3d: num_per_class and num_points must be >= 1, got {num_per_class} and {num_points}")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(len(CLASSES)), num_per_class))
    clouds = np.stack([sample_shape(rng, int(y), num_points, noise, occlusion_prob) for y in labels])
    return torch.from_numpy(clouds), torch.from_numpy(labels).long()
