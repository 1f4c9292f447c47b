"""The core's mixers by name, so that every model family can swap its mixer by keyword
(``zoo.create_model("vim_tiny", mixer="hydra")``).

A family passes the sizes its own mixer takes (d_state, d_conv, expand, and Vim's divide_out); each applies
where it means the same thing: d_conv is a causal conv width for the Mamba-1 and Mamba-2 mixers but not for
Hydra, whose centred conv keeps its own default (7) unless ``mixer_cfg`` sets it; ``divide_out`` only
exists for the two-direction mixers. ``mixer_cfg`` holds the rest (Mamba-2's headdim and ngroups, ...) and
wins over the family's values.
"""
from __future__ import annotations

import difflib
from typing import Any, Mapping, Optional

from torch import nn

from .hydra import Hydra
from .mamba import BiMamba, Mamba
from .mamba2 import BiMamba2, Mamba2

MIXERS = {"mamba": Mamba, "bimamba": BiMamba, "mamba2": Mamba2, "bimamba2": BiMamba2, "hydra": Hydra}
BIDIRECTIONAL = ("bimamba", "bimamba2", "hydra")


def check_mixer(owner: str, kind: str, allowed=tuple(MIXERS)) -> None:
    if kind not in allowed:
        close = difflib.get_close_matches(str(kind), allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{owner}: mixer must be one of {list(allowed)}, got {kind!r}{hint}")


def create_mixer(
    kind: str,
    d_model: int,
    d_state: int,
    d_conv: int,
    expand: float = 2,
    layer_idx: Optional[int] = None,
    divide_out: Optional[bool] = None,
    mixer_cfg: Optional[Mapping[str, Any]] = None,
) -> nn.Module:
    """A mixer of ``kind`` (one of ``MIXERS``) of width ``d_model``; see the module docstring for how the
    family's sizes apply."""
    check_mixer("create_mixer", kind)
    kwargs: dict = dict(d_state=d_state, expand=expand, layer_idx=layer_idx)
    if kind != "hydra":
        kwargs["d_conv"] = d_conv
    if divide_out is not None and kind in ("bimamba", "bimamba2"):
        kwargs["divide_out"] = divide_out
    return MIXERS[kind](d_model, **{**kwargs, **dict(mixer_cfg or {})})
