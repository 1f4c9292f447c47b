"""The ``zoo`` command line: ``zoo list | info | finetune | ...``.

``list`` and ``info`` live here; every module in ``zoo.tasks`` that defines ``add_cli(subparsers)``
adds its own subcommands (``finetune`` from zoo.tasks.classification, and so on).
"""
from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import shlex
import sys
from typing import Optional, Sequence


def _cli_list(args: argparse.Namespace) -> int:
    from zoo import list_models

    names = list_models(args.pattern, pretrained=args.pretrained)
    if not names:
        print(f"no model matches {args.pattern!r}" + (" with pretrained weights" if args.pretrained else ""), file=sys.stderr)
        return 1
    print("\n".join(names))
    return 0


def _print_tree(info: dict, indent: str = "") -> None:
    for key, value in info.items():
        if isinstance(value, dict):
            print(f"{indent}{key}:")
            _print_tree(value, indent + "  ")
        else:
            shown = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
            print(f"{indent}{key}: {shown}")


def _cli_info(args: argparse.Namespace) -> int:
    from zoo import model_info

    info = model_info(args.name)
    if args.json:
        print(json.dumps(info, indent=1, default=str))
        return 0
    # default_cfg repeats the default tag's entry of pretrained_cfgs; the text view shows it once.
    _print_tree({k: v for k, v in info.items() if k != "default_cfg"})
    return 0


def build_parser() -> argparse.ArgumentParser:
    from zoo import __version__
    import zoo.tasks

    parser = argparse.ArgumentParser(prog="zoo", description="mamba-zoo: Mamba-family models, their weights and tasks.")
    parser.add_argument("--version", action="version", version=f"mamba-zoo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="list registered models")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style pattern, e.g. 'vim*'")
    p.add_argument("--pretrained", action="store_true", help="only entries (with tags) that have pretrained weights")
    p.set_defaults(func=_cli_list)

    p = sub.add_parser("info", help="show a model's entry: config, parameters, pretrained weights")
    p.add_argument("name", help="model name, e.g. vim_tiny or vim_tiny.in1k")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cli_info)

    for mod in sorted(pkgutil.iter_modules(zoo.tasks.__path__), key=lambda m: m.name):
        task = importlib.import_module(f"zoo.tasks.{mod.name}")
        if hasattr(task, "add_cli"):
            task.add_cli(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = "zoo " + shlex.join(argv)
    try:
        return args.func(args)
    except (ValueError, LookupError, ImportError, FileNotFoundError, ArithmeticError) as e:
        # Expected failures (unknown names, missing extras, bad files, a diverged loss): the message, not a traceback.
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"zoo {args.command}: error: {message}", file=sys.stderr)
        return 2
