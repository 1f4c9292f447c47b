"""Checks of numeric arguments and of input dtypes, shared by the models, the tasks and the CLI.

Every message names the argument, the value that came and what is allowed, e.g.
``VisionMamba: depth must be an integer >= 1, got 0``.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Sequence

import torch


def describe_range(kind: type, low: Optional[float] = None, high: Optional[float] = None,
                   low_open: bool = False, high_open: bool = False) -> str:
    """``"an integer >= 1"``, ``"a number in [0, 1)"``, ``"a number > 0"``, ..."""
    what = "an integer" if kind is int else "a number"
    if low is not None and high is not None:
        return f"{what} in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{what} {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{what} {'<' if high_open else '<='} {high:g}"
    return what if kind is int else "a finite number"


def range_error(kind: type, value: Any, low: Optional[float] = None, high: Optional[float] = None,
                low_open: bool = False, high_open: bool = False, optional: bool = False) -> Optional[str]:
    """What is wrong with ``value`` as ``kind`` in the range (``None`` when nothing is): the text after the name."""
    expected = describe_range(kind, low, high, low_open, high_open) + (" or None" if optional else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or (kind is int and not isinstance(value, numbers.Integral)):
        return f"must be {expected}, got {value!r} ({type(value).__name__})"
    if not math.isfinite(value) or (low is not None and (value <= low if low_open else value < low)) \
            or (high is not None and (value >= high if high_open else value > high)):
        return f"must be {expected}, got {value!r}"
    return None


def check_int(name: str, value: Any, low: Optional[int] = None, high: Optional[int] = None, *, optional: bool = False):
    """``value`` if it is an integer in [low, high] (or ``None`` with ``optional``), else a ValueError naming ``name``."""
    if value is None and optional:
        return None
    problem = range_error(int, value, low, high, optional=optional)
    if problem:
        raise ValueError(f"{name} {problem}")
    return value


def check_float(name: str, value: Any, low: Optional[float] = None, high: Optional[float] = None, *,
                low_open: bool = False, high_open: bool = False, optional: bool = False):
    """``value`` if it is a finite real number in the range (open ends with ``low_open`` / ``high_open``)."""
    if value is None and optional:
        return None
    problem = range_error(float, value, low, high, low_open, high_open, optional)
    if problem:
        raise ValueError(f"{name} {problem}")
    return value


def check_ints(name: str, values: Any, low: int = 1, length: Optional[int] = None) -> Sequence[int]:
    """A sequence of integers >= ``low`` (``length`` of them when given), e.g. a stage's ``depths``."""
    if not isinstance(values, Sequence) or isinstance(values, str) or not values \
            or any(range_error(int, v, low) for v in values) or (length is not None and len(values) != length):
        count = f"{length} " if length is not None else "a non-empty sequence of "
        raise ValueError(f"{name} must be {count}integers >= {low}, got {values!r}")
    return values


def check_input_dtype(owner: str, x: torch.Tensor, reference: torch.Tensor, what: str = "images") -> None:
    """``x`` must be floating and, outside autocast, of ``reference``'s dtype (the model's parameters): a
    float32 model takes float32, a model converted with ``.double()`` float64. Integer inputs (uint8 images)
    are refused with the conversion to make."""
    if not x.is_floating_point():
        hint = (" (raw pixels: convert and normalise them first, e.g. (x.float() / 255 - mean) / std with the "
                "entry's pretrained_cfg mean and std)") if x.dtype == torch.uint8 else ""
        raise ValueError(f"{owner}: expected {what} of dtype {reference.dtype} (the model's parameters), got {x.dtype}{hint}")
    if x.dtype == reference.dtype:
        return
    if torch.is_autocast_enabled(x.device.type) and x.dtype != torch.float64:
        return  # autocast casts float32 / half inputs for each op
    raise ValueError(f"{owner}: expected {what} of dtype {reference.dtype} (the model's parameters), got {x.dtype}; "
                     f"convert the {what} with x.to({reference.dtype}) or the model with model.to({x.dtype})")


def check_sizes(owner: str, **values: Any) -> None:
    """Each keyword an integer >= 1 (depths, widths, state sizes): ``check_sizes("VisionMamba", depth=depth)``."""
    for name, value in values.items():
        check_int(f"{owner}: {name}", value, 1)


def check_rates(owner: str, **values: Any) -> None:
    """Each keyword a probability in [0, 1) (dropout and drop-path rates)."""
    for name, value in values.items():
        check_float(f"{owner}: {name}", value, 0, 1, high_open=True)


def check_num_classes(owner: str, num_classes: Any) -> None:
    """An integer >= 0 (0: no head, the pooled features)."""
    check_int(f"{owner}: num_classes", num_classes, 0)
