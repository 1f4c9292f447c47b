"""UperNet (Xiao et al., ECCV 2018) semantic segmentation on any zoo ``features_only`` backbone.

Head, as the UperNet configs of the Vim / VMamba segmentation code (MMSegmentation's UPerHead layout):
pyramid pooling (PPM, pool scales 1-2-3-6) on the coarsest map -> FPN: 1x1 lateral convolutions, top-down
upsample-and-add, a 3x3 convolution per level -> every level upsampled to the finest one, concatenated ->
3x3 fuse convolution -> dropout -> 1x1 classifier. Every convolution but the classifier is conv-BN-ReLU.
No auxiliary FCN head (the published recipes add one on the third map for training only).

Single-scale backbones (Vim: every map at the patch stride r) get ``SimplePyramid`` first: four maps
resampled to strides r/4, r/2, r, 2r by two 2x2 transposed convolutions (with BN + GELU between), one
transposed convolution, identity and 2x2 max-pooling, as MMSegmentation's BEiT / MAE UperNet backbones do
(its ViT / DeiT configs resample by interpolation in a MultiLevelNeck instead); no ViT-Adapter.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from zoo.registry import create_model

__all__ = ["UperNetHead", "SimplePyramid", "SegmentationModel", "PPM"]


def conv_bn_relu(in_chs: int, out_chs: int, kernel_size: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_chs, out_chs, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_chs),
        nn.ReLU(inplace=True),
    )


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return x if x.shape[-2:] == tuple(size) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class PPM(nn.Module):
    """Pyramid pooling: the map, and its average pools to s x s (one per scale) projected to ``channels`` and
    upsampled back, concatenated, then a 3x3 conv to ``channels``."""

    def __init__(self, in_chs: int, channels: int, pool_scales: Sequence[int] = (1, 2, 3, 6)):
        super().__init__()
        self.pools = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(in_chs, channels)) for s in pool_scales
        )
        self.bottleneck = conv_bn_relu(in_chs + len(pool_scales) * channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = [_resize(pool(x), x.shape[-2:]) for pool in self.pools]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))


class UperNetHead(nn.Module):
    """Maps (fine to coarse, channels ``in_channels``) -> logits (b, num_classes, h0, w0) at the finest map's size."""

    def __init__(
        self, in_channels: Sequence[int], num_classes: int, channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1,
    ):
        super().__init__()
        if len(in_channels) < 2:
            raise ValueError(f"UperNetHead: expected at least 2 feature maps, got in_channels={list(in_channels)}")
        self.in_channels = list(in_channels)
        self.ppm = PPM(in_channels[-1], channels, pool_scales)
        self.lateral = nn.ModuleList(conv_bn_relu(c, channels) for c in in_channels[:-1])
        self.fpn = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in in_channels[:-1])
        self.fuse = conv_bn_relu(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        if [f.shape[1] for f in feats] != self.in_channels:
            raise ValueError(
                f"UperNetHead: expected maps with channels {self.in_channels}, got {[f.shape[1] for f in feats]}"
            )
        levels = [lat(f) for lat, f in zip(self.lateral, feats)] + [self.ppm(feats[-1])]
        for i in range(len(levels) - 1, 0, -1):  # top-down: each level gets the coarser one added
            levels[i - 1] = levels[i - 1] + _resize(levels[i], levels[i - 1].shape[-2:])
        outs = [conv(level) for conv, level in zip(self.fpn, levels[:-1])] + [levels[-1]]
        size = outs[0].shape[-2:]
        fused = self.fuse(torch.cat([_resize(o, size) for o in outs], dim=1))
        return self.classifier(self.dropout(fused))


class SimplePyramid(nn.Module):
    """Four same-stride maps -> strides x1/4, x1/2, x1, x2 of theirs (upsample by transposed convolutions,
    downsample by max-pooling); channels are kept."""

    SCALES = (4, 2, 1, 0.5)

    def __init__(self, channels: int):
        super().__init__()
        c = channels
        self.levels = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(c, c, 2, 2), nn.BatchNorm2d(c), nn.GELU(), nn.ConvTranspose2d(c, c, 2, 2)),
            nn.ConvTranspose2d(c, c, 2, 2),
            nn.Identity(),
            nn.MaxPool2d(2, ceil_mode=True),
        ])

    def forward(self, feats: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        if len(feats) != len(self.levels):
            raise ValueError(f"SimplePyramid: expected {len(self.levels)} maps, got {len(feats)}")
        return [level(f) for level, f in zip(self.levels, feats)]


def _default_out_indices(num_maps: int, single_scale: bool) -> Optional[List[int]]:
    # Single-scale backbones give one map per block: the last of each quarter of the depth, as the Vim/ViT
    # UperNet configs (e.g. blocks 5, 11, 17, 23 of 24). Hierarchical ones: every stage.
    if not single_scale:
        return None
    if num_maps < 4:
        raise ValueError(f"SegmentationModel: a single-scale backbone needs at least 4 blocks for 4 maps, got {num_maps}")
    return [num_maps * (q + 1) // 4 - 1 for q in range(4)]


class SegmentationModel(nn.Module):
    """``backbone_name`` built with ``features_only=True`` + (for single-scale backbones) ``SimplePyramid`` +
    ``UperNetHead``; images (b, c, H, W) -> logits (b, num_classes, H, W), bilinearly upsampled.

    ``out_indices`` picks the backbone maps (default: every stage of a hierarchical backbone, four evenly
    spaced blocks of a single-scale one); other kwargs (``pretrained``, ``depth``, ``dims``, ...) go to
    ``zoo.create_model``.
    """

    def __init__(
        self, backbone_name: str, num_classes: int, out_indices: Optional[Sequence[int]] = None,
        channels: int = 512, pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1, **backbone_kwargs,
    ):
        super().__init__()
        probe_kwargs = {k: v for k, v in backbone_kwargs.items() if k not in ("pretrained", "checkpoint_path")}
        with torch.device("meta"):  # feature_info only: no memory, no weights
            info = create_model(backbone_name, **probe_kwargs).feature_info
        single_scale = len({i["reduction"] for i in info}) == 1
        if out_indices is None:
            out_indices = _default_out_indices(len(info), single_scale)
        self.backbone = create_model(backbone_name, features_only=True, out_indices=out_indices, **backbone_kwargs)
        chans = self.backbone.feature_info.channels()
        if single_scale:
            if len(set(chans)) != 1 or len(chans) != 4:
                raise ValueError(f"SegmentationModel: a single-scale backbone needs 4 maps of one width, got {chans}")
            self.neck = SimplePyramid(chans[0])
        else:
            self.neck = nn.Identity()
        self.head = UperNetHead(chans, num_classes, channels, pool_scales, dropout)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _resize(self.head(self.neck(self.backbone(x))), x.shape[-2:])
