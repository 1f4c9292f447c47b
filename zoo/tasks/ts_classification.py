"""Time-series classification with the S-Mamba and Chimera encoders on UCR/UEA sets that aeon ships
(``zoo tsc bench``), against the classic 1-nearest-neighbour (Euclidean) baseline.

The official train / test splits are used as they are; with no validation part, every model trains
for a fixed number of epochs (AdamW, cross-entropy, cosine schedule) and is tested once at the end,
over several seeds.
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from zoo.data.timeseries import list_classification_sets, load_classification_set
from zoo.models.timeseries import ChimeraClassifier, SMambaClassifier
from zoo.tasks.engine import check_float, check_int, check_output_file, number_arg, write_text_atomic

__all__ = ["TSC_MODELS", "nearest_neighbour_accuracy", "train_classifier", "build_classifier", "run_tsc_benchmark", "add_cli"]

TSC_MODELS = ("smamba_classifier", "chimera_classifier")


def build_classifier(
    name: str, seq_len: int, num_classes: int, d_model: int = 64, d_state: int = 16, d_ff: int = 128,
    e_layers: int = 2, patch_len: Optional[int] = None, layer_shuffle: float = 0.0,
) -> torch.nn.Module:
    """A classifier by name (``TSC_MODELS``). ``patch_len`` None: S-Mamba's variate tokens, Chimera's cells of one
    step; d_ff and layer_shuffle apply to S-Mamba only (Chimera has neither)."""
    if name == "smamba_classifier":
        return SMambaClassifier(seq_len, num_classes, d_model=d_model, d_state=d_state, d_ff=d_ff, e_layers=e_layers,
                                patch_len=patch_len, layer_shuffle=layer_shuffle)
    if name == "chimera_classifier":
        return ChimeraClassifier(seq_len, num_classes, d_model=d_model, d_state=d_state, e_layers=e_layers,
                                 patch_len=patch_len or 1)
    raise ValueError(f"unknown classifier {name!r}; expected one of {list(TSC_MODELS)}")


def nearest_neighbour_accuracy(X_train, y_train, X_test, y_test) -> float:
    """1-NN with the Euclidean distance over the whole (length x variates) series."""
    d = torch.cdist(torch.as_tensor(X_test).flatten(1), torch.as_tensor(X_train).flatten(1))
    pred = torch.as_tensor(y_train)[d.argmin(1)]
    return (pred == torch.as_tensor(y_test)).float().mean().item()


def train_classifier(
    model: torch.nn.Module, X: np.ndarray, y: np.ndarray, epochs: int = 100, lr: float = 1e-3,
    batch_size: int = 16, weight_decay: float = 0.05, seed: int = 0, progress: bool = True,
) -> float:
    """Train in place; returns the seconds taken."""
    gen = torch.Generator().manual_seed(seed)
    X, y = torch.as_tensor(X), torch.as_tensor(y)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * -(-len(X) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    start = time.perf_counter()
    model.train()
    bar = tqdm(range(epochs), desc=type(model).__name__, leave=False, disable=not progress)
    for _ in bar:
        order = torch.randperm(len(X), generator=gen)
        for i in range(0, len(X), batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(model(X[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return time.perf_counter() - start


@torch.no_grad()
def _accuracy(model, X, y) -> float:
    model.eval()
    return (model(torch.as_tensor(X)).argmax(1) == torch.as_tensor(y)).float().mean().item()


def run_tsc_benchmark(
    dataset: str = "BasicMotions", seeds: Sequence[int] = (0, 1, 2), epochs: int = 100, lr: float = 1e-3,
    batch_size: int = 16, d_model: int = 64, d_state: int = 16, d_ff: int = 128, e_layers: int = 2,
    patch_len: Optional[int] = None, output: Optional[str] = None, progress: bool = True,
    command: Optional[str] = None, save_weights: Optional[str] = None, layer_shuffle: float = 0.0,
    models: Sequence[str] = ("smamba_classifier",),
) -> dict:
    """Test accuracy of 1-NN (Euclidean) and each classifier of ``models`` (``TSC_MODELS``; mean and per seed);
    printed and returned.

    ``save_weights`` (one seed, one model) writes the trained classifier's state dict (safetensors).
    """
    unknown = [m for m in models if m not in TSC_MODELS]
    if unknown or not models:
        raise ValueError(f"tsc bench: unknown classifiers {unknown}; expected some of {list(TSC_MODELS)}")
    if save_weights and len(seeds) != 1:
        raise ValueError(f"tsc bench: --save-weights needs one seed, got {list(seeds)}")
    if save_weights and len(models) != 1:
        raise ValueError(f"tsc bench: --save-weights needs one model, got {list(models)}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("d_model", d_model), ("d_state", d_state),
                        ("d_ff", d_ff), ("e_layers", e_layers)):
        check_int(f"tsc bench: {name}", value, 1)
    check_int("tsc bench: patch_len", patch_len, 1, optional=True)
    for seed in seeds:
        check_int("tsc bench: seed", seed, 0)
    check_float("tsc bench: lr", lr, 0, low_open=True)
    for option, path in (("--output", output), ("--save-weights", save_weights)):
        if path:  # before any training: a run is not thrown away because its results cannot be written
            check_output_file(path, option)
    X_train, y_train, classes = load_classification_set(dataset, "train")
    X_test, y_test, _ = load_classification_set(dataset, "test")
    knn = nearest_neighbour_accuracy(X_train, y_train, X_test, y_test)
    rows = [{"model": "1nn_euclidean", "params": 0, "test_acc_mean": knn, "test_acc": [knn], "seconds": 0.0}]
    for name in models:
        accs, seconds = [], []
        for seed in seeds:
            torch.manual_seed(seed)
            model = build_classifier(name, X_train.shape[1], len(classes), d_model, d_state, d_ff, e_layers, patch_len,
                                     layer_shuffle)
            seconds.append(train_classifier(model, X_train, y_train, epochs, lr, batch_size, seed=seed, progress=progress))
            accs.append(_accuracy(model, X_test, y_test))
        rows.append({"model": name, "params": sum(p.numel() for p in model.parameters()),
                     "test_acc_mean": statistics.mean(accs), "test_acc": accs, "seconds": statistics.mean(seconds)})
    result = {
        "dataset": dataset, "classes": classes, "train": list(X_train.shape), "test": list(X_test.shape),
        "rows": rows,
        "settings": {"seeds": list(seeds), "epochs": epochs, "lr": lr, "batch_size": batch_size, "d_model": d_model,
                     "d_state": d_state, "d_ff": d_ff, "e_layers": e_layers, "patch_len": patch_len,
                     "layer_shuffle": layer_shuffle},
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
        "command": command,
    }
    print(f"{dataset}: train {tuple(X_train.shape)}, test {tuple(X_test.shape)} (n, length, variates)\n")
    print("| model | params | test accuracy (mean) | per seed |\n|---|---:|---:|---|")
    for r in result["rows"]:
        print(f"| {r['model']} | {r['params']:,} | {r['test_acc_mean']:.4f} | {', '.join(f'{a:.4f}' for a in r['test_acc'])} |")
    if output:
        write_text_atomic(output, json.dumps(result, indent=2) + "\n")
    if save_weights:
        from zoo.hub import save_state_dict

        save_state_dict(model, save_weights)
    return result


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("tsc", help="time-series classification on UCR/UEA sets shipped by aeon")
    sub = p.add_subparsers(dest="tsc_command", required=True)
    b = sub.add_parser("bench", help="S-Mamba (and Chimera) classifiers against 1-NN (Euclidean)")
    b.add_argument("--dataset", default="BasicMotions", choices=list_classification_sets())
    b.add_argument("--models", nargs="+", default=["smamba_classifier"], choices=TSC_MODELS)
    b.add_argument("--seeds", nargs="+", type=number_arg(int, 0), default=[0, 1, 2])
    b.add_argument("--epochs", type=number_arg(int, 1), default=100)
    b.add_argument("--lr", type=number_arg(float, 0, low_open=True), default=1e-3)
    b.add_argument("--batch-size", type=number_arg(int, 1), default=16)
    b.add_argument("--d-model", type=number_arg(int, 1), default=64)
    b.add_argument("--d-state", type=number_arg(int, 1), default=16)
    b.add_argument("--d-ff", type=number_arg(int, 1), default=128)
    b.add_argument("--e-layers", type=number_arg(int, 1), default=2)
    b.add_argument("--patch-len", type=number_arg(int, 1), default=None, help="patch tokens of this length (default: S-Mamba's variate tokens, Chimera's one-step cells)")
    b.add_argument("--layer-shuffle", type=number_arg(float, 0, 1), default=0.0,
                   help="stochastic layer-wise token shuffle in training (ShuffleMamba): the last layer's probability")
    b.add_argument("--output", default=None, help="write the result as JSON here")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.add_argument("--save-weights", default=None, help="write the trained classifier's state dict here (safetensors; one seed)")
    b.set_defaults(func=_cli_bench)


def _cli_bench(args: argparse.Namespace) -> int:
    run_tsc_benchmark(
        args.dataset, args.seeds, args.epochs, args.lr, args.batch_size, args.d_model, args.d_state, args.d_ff,
        args.e_layers, args.patch_len, args.output, progress=not args.quiet,
        command=getattr(args, "command_line", None) or "zoo " + shlex.join(sys.argv[1:]), save_weights=args.save_weights,
        layer_shuffle=args.layer_shuffle, models=args.models,
    )
    return 0


if __name__ == "__main__":  # `python -m zoo.tasks.ts_classification bench ...`, the same as `zoo tsc bench ...`
    parser = argparse.ArgumentParser(prog="python -m zoo.tasks.ts_classification")
    add_cli(parser.add_subparsers(dest="command", required=True))
    cli_args = parser.parse_args(["tsc", *sys.argv[1:]])
    cli_args.command_line = "python -m zoo.tasks.ts_classification " + shlex.join(sys.argv[1:])
    sys.exit(cli_args.func(cli_args))
