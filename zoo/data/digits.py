"""Image classification on scikit-learn's handwritten digits (UCI "Optical Recognition of
Handwritten Digits": 1,797 grayscale scans of 8x8 pixels, 10 classes), upsampled for vision models.

The split is stratified and seeded, so every run and every model sees the same train and test images.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

SPLITS = ("train", "test")


def _load_digits():
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # scikit-learn is the optional "data" extra
        raise ImportError(
            "the 'digits' dataset needs scikit-learn, which is not installed: pip install 'mamba-zoo[data]'"
        ) from e
    digits = load_digits()
    return digits.images, digits.target, train_test_split


class DigitsDataset(Dataset):
    """(image, label) pairs: float images (3, img_size, img_size) normalised with ``mean``/``std``
    (a model's ``pretrained_cfg``), labels 0..9.

    The 8x8 scans (values 0..16) are scaled to [0, 1], upsampled bilinearly and repeated to 3
    channels once, up front. ``augment`` (default: on for the train split) applies a random small
    affine warp per image: shift up to 1/8 of the side, rotation up to 10 degrees, scale 0.9..1.1.
    """

    num_classes = 10

    def __init__(
        self,
        split: str = "train",
        img_size: int = 32,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        augment: Optional[bool] = None,
        test_fraction: float = 0.2,
        seed: int = 0,
    ):
        if split not in SPLITS:
            raise ValueError(f"DigitsDataset: split must be one of {SPLITS}, got {split!r}")
        if img_size < 8:
            raise ValueError(f"DigitsDataset: img_size must be at least 8 (the scans are 8x8), got {img_size}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"DigitsDataset: mean and std need 3 values (RGB), got {len(mean)} and {len(std)}")
        images, labels, train_test_split = _load_digits()
        train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=test_fraction, stratify=labels, random_state=seed)
        idx = train_idx if split == "train" else test_idx

        x = torch.as_tensor(images[idx], dtype=torch.float32).unsqueeze(1) / 16.0
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        # Background is 0 before normalisation; remembered so warped-in borders stay background.
        self.background = ((0.0 - mean_t) / std_t).view(3, 1, 1)
        self.images = ((x - mean_t) / std_t).contiguous()
        self.labels = torch.as_tensor(labels[idx], dtype=torch.long)
        self.split = split
        self.img_size = img_size
        self.augment = split == "train" if augment is None else augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.__getitems__([i])[0]

    def __getitems__(self, indices):
        # The DataLoader fetches a whole batch through this hook, so the warp runs once per batch.
        imgs = self.images[indices]
        if self.augment:
            imgs = self._random_affine(imgs)
        return list(zip(imgs, self.labels[indices]))

    def _random_affine(self, imgs: torch.Tensor) -> torch.Tensor:
        n = imgs.shape[0]
        angle = torch.empty(n).uniform_(-math.radians(10.0), math.radians(10.0))
        scale = torch.empty(n).uniform_(0.9, 1.1)
        # affine_grid works in [-1, 1] coordinates: a shift of 1/8 of the side is 0.25.
        shift = torch.empty(n, 2).uniform_(-0.25, 0.25)
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta, list(imgs.shape), align_corners=False)
        # Warp the image minus its background so that the zero padding is background.
        out = F.grid_sample(imgs - self.background, grid, mode="bilinear", align_corners=False)
        return out + self.background


_DATASETS = {"digits": DigitsDataset}


def list_datasets():
    """Names accepted by :func:`create_dataset`."""
    return sorted(_DATASETS)


def dataset_class(name: str):
    """The Dataset class registered as ``name``; its ``num_classes`` is known before loading any data."""
    if name not in _DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of: {', '.join(list_datasets())}")
    return _DATASETS[name]


def create_dataset(name: str, split: str = "train", **kwargs) -> Dataset:
    """An embedded image-classification dataset by name (see :func:`list_datasets`)."""
    return dataset_class(name)(split=split, **kwargs)
