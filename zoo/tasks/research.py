"""``zoo dynamics MODEL``: the token-dynamics report (zoo.research.token_dynamics) for any entry."""
from __future__ import annotations

import argparse
import ast
import json
from typing import Any, Dict, Sequence

import torch

from zoo.core.checks import check_int
from zoo.tasks.engine import number_arg


def parse_kwargs(items: Sequence[str]) -> Dict[str, Any]:
    """``key=value`` strings -> dict, values read as Python literals when they parse (else strings)."""
    out: Dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected key=value, got {item!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def example_input(model, batch: int, input_size=None, seed: int = 0) -> torch.Tensor:
    """A standard-normal batch of shape (batch, *input_size); input_size defaults to the entry's
    ``pretrained_cfg['input_size']``."""
    check_int("example_input: batch", batch, 1)
    size = input_size or (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    if not size:
        raise ValueError(f"{type(model).__name__} has no pretrained_cfg['input_size']; give --input-size, e.g. 3,32,32")
    return torch.randn((batch, *size), generator=torch.Generator().manual_seed(seed))


def parse_input_size(text: str):
    """``"3,32,32"`` -> (3, 32, 32): positive integers, separated by commas."""
    try:
        size = tuple(int(s) for s in text.split(","))
    except ValueError:
        size = ()
    if not size or min(size) < 1:
        raise argparse.ArgumentTypeError(f"must be positive integers separated by commas, e.g. 3,32,32; got {text!r}")
    return size


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "dynamics", help="token dynamics per Mamba layer: convergent/divergent scenario and token importance (Vo et al. 2025)"
    )
    p.add_argument("model", help="model name, e.g. vim_tiny")
    p.add_argument("--pretrained", action="store_true", help="load the entry's pretrained weights")
    p.add_argument("--checkpoint", default=None, help="local checkpoint to load")
    p.add_argument("--batch", type=number_arg(int, 1), default=2, help="random input batch size (default 2)")
    p.add_argument("--input-size", type=parse_input_size, default=None, help="input shape without batch, e.g. 3,32,32 (default: the entry's)")
    p.add_argument("--params-only", action="store_true", help="only the parameter criterion, no forward pass")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--set", dest="kwargs", nargs="+", default=[], metavar="KEY=VALUE",
                   help="model overrides, e.g. --set img_size=32 depth=2")
    p.set_defaults(func=_cli_dynamics)


def _cli_dynamics(args: argparse.Namespace) -> int:
    import zoo
    from zoo.research.token_dynamics import format_report, token_dynamics_report

    model = zoo.create_model(args.model, pretrained=args.pretrained, checkpoint_path=args.checkpoint, **parse_kwargs(args.kwargs))
    inputs = ()
    if not args.params_only:
        inputs = (example_input(model, args.batch, args.input_size),)
    reports = token_dynamics_report(model, *inputs)
    if args.json:
        print(json.dumps([r.summary() for r in reports], indent=1))
    else:
        print(f"{args.model}: {len(reports)} scan directions" + ("" if inputs else " (parameters only)"))
        print(format_report(reports))
    return 0
