"""What the time-series models share: the timm-style interface of an ``encoder`` of ``layers`` plus a ``head``."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class EncoderHeadModel(nn.Module):
    """timm's optimizer / fine-tuning hooks for a model made of ``self.encoder`` (with ``embed``, ``layers`` and a
    ``grad_checkpointing`` flag) and ``self.head``."""

    @torch.jit.ignore
    def no_weight_decay(self):
        return {n for n, p in self.named_parameters() if getattr(p, "_no_weight_decay", False)}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r"^encoder\.embed", blocks=r"^encoder\.layers\.(\d+)" if coarse else r"^encoder\.layers\.(\d+)\.(\w+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        """The last projection (``head``): to the horizon for forecasters, to the classes for classifiers."""
        return self.head


class ForecasterModel(EncoderHeadModel):
    """A forecaster's head maps ``head_hidden_size`` features to the horizon ``pred_len``, timm's 'classifier'."""

    @property
    def num_classes(self) -> int:
        """timm's name for the head's width: the horizon."""
        return self.pred_len

    def reset_classifier(self, pred_len: int, global_pool: Optional[str] = None) -> None:
        """Replace the projection with a fresh one to a new horizon (the forecaster's 'classifier')."""
        self.pred_len = pred_len
        self.head = nn.Linear(self.head_hidden_size, pred_len)
        # The horizon is a constructor argument: recorded where timm's export (zoo.registry.save_for_hf) reads them.
        self._model_args = {**getattr(self, "_model_args", {}), "pred_len": pred_len}


class ClassifierModel(EncoderHeadModel):
    """A series classifier's head maps ``num_features`` to ``num_classes`` logits (none: an identity)."""

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
