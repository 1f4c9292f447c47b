"""The zoo's vision backbones in MMSegmentation's ``MODELS`` registry.

With mmseg installed, a config imports this module and names a backbone by zoo entry::

    custom_imports = dict(imports=["zoo.integrations.mmseg"], allow_failed_imports=False)
    model = dict(
        type="EncoderDecoder",
        backbone=dict(type="ZooBackbone", model_name="vmamba_tiny", out_indices=(0, 1, 2, 3), pretrained=True),
        decode_head=dict(type="UPerHead", in_channels=[96, 192, 384, 768], ...),
    )

``type="zoo_vmamba_tiny"`` (one name per entry, ``zoo_`` + the entry) is the same with ``model_name`` filled
in. The backbone returns the tuple of (b, c, h, w) maps mmseg's decode heads take; its weights come from
``zoo.create_model`` (``pretrained`` / ``checkpoint_path``), so ``init_weights`` leaves them as they are.
Single-scale backbones (Vim) give four maps of one stride; ``simple_pyramid=True`` resamples them to
strides /4, /2, x1, x2 of the patch stride (zoo.models.vision.upernet.SimplePyramid), for heads that want a
pyramid (mmseg's ViT configs use a ``MultiLevelNeck`` instead).

Importing this module registers everything when ``mmseg`` is importable and does nothing otherwise;
``register_mmseg_backbones(registry)`` registers into any registry with mmengine's ``register_module``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from zoo.registry import create_model, list_models

__all__ = ["ZooBackbone", "register_mmseg_backbones", "VISION_PATTERNS"]

# Entries with timm's feature interface (forward_intermediates + feature_info).
VISION_PATTERNS = ("vim_*", "vmamba_*", "efficient_vmamba_*")


class ZooBackbone(nn.Module):
    """A zoo entry built with ``features_only=True``; images -> tuple of (b, c, h, w) maps (``out_channels``)."""

    def __init__(
        self, model_name: str, out_indices: Optional[Sequence[int]] = None, pretrained: bool = False,
        checkpoint_path: Optional[str] = None, simple_pyramid: bool = False, init_cfg=None, **model_kwargs,
    ):
        super().__init__()
        if init_cfg is not None:
            # mmengine would initialise over the zoo's weights; pretrained / checkpoint_path load them instead.
            raise ValueError(f"ZooBackbone: init_cfg is not supported, got {init_cfg!r}; use pretrained=True or checkpoint_path")
        out_indices = tuple(out_indices) if out_indices is not None else None
        self.model = create_model(
            model_name, pretrained=pretrained, checkpoint_path=checkpoint_path, features_only=True,
            out_indices=out_indices, **model_kwargs,
        )
        channels = self.model.feature_info.channels()
        reductions = self.model.feature_info.reduction()
        self.neck = None
        if simple_pyramid:
            from zoo.models.vision.upernet import SimplePyramid

            if len(channels) != 4 or len(set(channels)) != 1 or len(set(reductions)) != 1:
                raise ValueError(
                    f"ZooBackbone: simple_pyramid needs 4 maps of one width and stride, got channels {channels}, "
                    f"strides {reductions}"
                )
            self.neck = SimplePyramid(channels[0])
            reductions = [int(reductions[0] / s) for s in SimplePyramid.SCALES]
        self.out_channels: List[int] = channels
        self.strides: List[int] = reductions

    def init_weights(self) -> None:
        """Weights come from create_model (random init, pretrained or checkpoint_path): nothing to do."""

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        feats = self.model(x)
        return tuple(self.neck(feats) if self.neck is not None else feats)


def _entry_builder(name: str):
    def build(**kwargs) -> ZooBackbone:
        return ZooBackbone(name, **kwargs)

    build.__name__ = build.__qualname__ = f"zoo_{name}"
    build.__doc__ = f"ZooBackbone('{name}', ...)"
    return build


def register_mmseg_backbones(registry=None) -> List[str]:
    """Register ``ZooBackbone`` and one ``zoo_<entry>`` builder per vision entry into ``registry`` (default:
    ``mmseg.registry.MODELS``); returns the names registered. Registering again replaces them."""
    if registry is None:
        from mmseg.registry import MODELS as registry
    registry.register_module(name="ZooBackbone", module=ZooBackbone, force=True)
    names = ["ZooBackbone"]
    for entry in sorted({n for pattern in VISION_PATTERNS for n in list_models(pattern)}):
        registry.register_module(name=f"zoo_{entry}", module=_entry_builder(entry), force=True)
        names.append(f"zoo_{entry}")
    return names


try:
    import mmseg.registry  # noqa: F401
except ImportError:  # mmseg (and its mmcv / mmengine) not installed: the module still imports
    pass
else:
    register_mmseg_backbones()
