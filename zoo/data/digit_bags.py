"""A MIL task on real images available offline: bags of scikit-learn's handwritten digits
(1,797 scans of 8x8 pixels, UCI "Optical Recognition of Handwritten Digits"), labelled positive
iff the bag holds at least one instance of the target digit (Ilse et al.'s MNIST-bags, on digits).

The images are split into disjoint train / test pools first, so no test bag shares an image with
a training bag. Instances are the 64 pixel intensities scaled to [0, 1].
"""
from __future__ import annotations

from typing import List, Tuple

import numpy as np
import torch


def _digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # the data extra
        raise ImportError("digit bags need scikit-learn (pip install 'mamba-zoo[data]')") from e
    d = load_digits()
    return d.data.astype(np.float32) / 16.0, d.target


def make_digit_bags(
    num_bags: int,
    split: str = "train",
    target: int = 9,
    bag_size: Tuple[int, int] = (8, 48),
    test_fraction: float = 0.5,
    seed: int = 0,
) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """``num_bags`` bags (half positive) with sizes uniform in ``bag_size`` (inclusive).

    A positive bag holds 1 to 3 images of ``target`` at random positions among other digits; a
    negative bag holds none. Returns (list of (n_i, 64) float tensors, labels (num_bags,) int64).
    """
    if split not in ("train", "test"):
        raise ValueError(f"make_digit_bags: split must be 'train' or 'test', got {split!r}")
    lo, hi = bag_size
    if not 4 <= lo <= hi:
        raise ValueError(f"make_digit_bags: bag_size must be (min, max) with 4 <= min <= max, got {bag_size}")
    x, y = _digits()
    # One fixed image split for every seed; the seed only changes which bags are drawn.
    perm = np.random.default_rng(12345).permutation(len(y))
    n_test = int(round(test_fraction * len(y)))
    pool = perm[:n_test] if split == "test" else perm[n_test:]
    pos_pool, neg_pool = pool[y[pool] == target], pool[y[pool] != target]
    rng = np.random.default_rng(seed * 2 + (split == "test"))
    bags, labels = [], []
    for i in range(num_bags):
        n = int(rng.integers(lo, hi + 1))
        label = i % 2
        k = int(rng.integers(1, 4)) if label else 0
        idx = np.concatenate([rng.choice(pos_pool, k), rng.choice(neg_pool, n - k)])
        bags.append(torch.from_numpy(x[rng.permutation(idx)]))
        labels.append(label)
    order = rng.permutation(num_bags)
    return [bags[i] for i in order], torch.tensor(labels, dtype=torch.long)[order]
