"""What the time-series models share: the timm-style interface of an ``encoder`` of ``layers`` plus a ``head``."""
from __future__ import annotations

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
