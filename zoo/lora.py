"""Parameter-efficient fine-tuning of any entry with LoRA through the ``peft`` library (``pip install
mamba-zoo[peft]``).

What gets adapters: the projections of every state-space mixer of the core, whichever family stacks them
(Mamba's ``in_proj``, ``x_proj``, ``dt_proj``, ``out_proj`` and the backward direction's ``x_proj_b`` /
``dt_proj_b``; Mamba-2's and Hydra's ``in_proj`` / ``out_proj``; VMamba's SS2D ``in_proj`` / ``out_proj``; the
language models' attention ``in_proj`` / ``out_proj``), when they are ``nn.Linear``. The convolutions, norms,
embeddings, A, D and dt biases stay frozen.

What trains in full (``modules_to_save``): the task head, which a new task initialises from scratch:

==========================  ==========================  ============================================
family                      model class                 head trained in full
==========================  ==========================  ============================================
Vim, VMamba, EffVMamba      VisionMamba, VMamba, ...    ``head``
PointMamba                  PointMamba                  ``cls_head_finetune`` (the whole MLP head)
PointMamba part seg.        PointMambaPartSeg           the segmentation head (``label_conv``, ``propagation_0``,
                                                        ``convs1-3``, ``bns1-2``)
PCM                         PointCloudMamba             ``prediction``
S-Mamba                     SMamba, SMambaClassifier    ``head``
MambaMIL                    MambaMIL                    ``classifier``
speech                      MambaSpeechEncoder          ``head``
language models             MambaLMHeadModel            none (``lm_head`` is tied to the embedding)
==========================  ==========================  ============================================

(Other classes: the pretrained cfg's ``classifier``.) ``merge_lora`` folds the adapters into the weights and
returns the plain model, whose state dict has the entry's own layout (``create_model(..., checkpoint_path=)``
loads it).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch.nn as nn

from .core.checks import check_float, check_int

MIXER_PROJECTIONS = ("in_proj", "x_proj", "x_proj_b", "dt_proj", "dt_proj_b", "out_proj")
HEADS = {
    "PointMamba": ("cls_head_finetune",),
    "PointMambaPartSeg": ("label_conv", "propagation_0", "convs1", "convs2", "convs3", "bns1", "bns2"),
    "PointCloudMamba": ("prediction",),
    "MambaLMHeadModel": (),
}


def lora_target_modules(model: nn.Module) -> list[str]:
    """Qualified names of the linear mixer projections that get adapters."""
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in MIXER_PROJECTIONS]


def lora_head_modules(model: nn.Module) -> list[str]:
    """Names of the modules trained in full (see the module docstring)."""
    cls = type(model).__name__
    if cls in HEADS:
        return list(HEADS[cls])
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    return [classifier] if classifier else []


def add_lora(model: nn.Module, rank: int, alpha: Optional[float] = None, dropout: float = 0.0,
             modules_to_save: Optional[Sequence[str]] = None) -> nn.Module:
    """``model`` wrapped by peft with LoRA of ``rank`` on its mixer projections (scale ``alpha / rank``;
    ``alpha`` defaults to 2 * rank) and its head trained in full (``modules_to_save``: the family's head,
    see the module docstring). Everything else is frozen."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:  # an optional extra: say how to get it
        raise ImportError("add_lora needs the peft library: pip install 'mamba-zoo[peft]'") from e
    check_int("add_lora: rank", rank, 1)
    check_float("add_lora: alpha", 2.0 * rank if alpha is None else alpha, 0.0, low_open=True)
    check_float("add_lora: dropout", dropout, 0.0, 1.0, high_open=True)
    targets = lora_target_modules(model)
    if not targets:
        raise ValueError(f"add_lora: {type(model).__name__} has no linear mixer projections "
                         f"(modules named {', '.join(MIXER_PROJECTIONS)}) to adapt")
    heads = list(lora_head_modules(model) if modules_to_save is None else modules_to_save)
    names = dict(model.named_modules())
    missing = [h for h in heads if h not in names]
    if missing:
        raise ValueError(f"add_lora: modules_to_save names no module of {type(model).__name__}: {missing}")
    config = LoraConfig(r=rank, lora_alpha=2.0 * rank if alpha is None else alpha, lora_dropout=dropout,
                        target_modules=targets, modules_to_save=heads or None)
    return get_peft_model(model, config)


def merge_lora(model: nn.Module) -> nn.Module:
    """The plain model with the adapters folded into its weights (and the trained heads in place)."""
    if not hasattr(model, "merge_and_unload"):
        raise TypeError(f"merge_lora: expected a model returned by add_lora, got {type(model).__name__}")
    return model.merge_and_unload()
