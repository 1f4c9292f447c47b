"""Multivariate long-term forecasting: train / evaluate loop, plots and the benchmark behind
``zoo forecast bench``.

Every trainable model goes through the same loop on the same windows: Adam on the MSE of the
standardised series, learning rate halved after every epoch (the papers' 'type1' schedule), early
stopping on the validation MSE with the best weights restored, then MSE and MAE over all test
windows on the standardised scale, as the papers report them.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import shlex
import sys
import time
from types import SimpleNamespace
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, RandomSampler
from tqdm.auto import tqdm

from zoo.data.timeseries import ForecastData, WindowDataset, list_series, load_forecast_data
from zoo.models.timeseries import Chimera, DLinear, ITransformer, LastValue, SeasonalNaive, SMamba
from zoo.tasks.engine import atomic_write, check_fields, check_output_file, number_arg, resolve_device, write_text_atomic

__all__ = [
    "BENCH_MODELS", "build_forecaster", "train_forecaster", "evaluate_forecaster", "plot_forecast",
    "run_forecast_benchmark", "format_table", "add_cli",
]

BENCH_MODELS = ("naive", "seasonal_naive", "dlinear", "itransformer", "smamba", "chimera")
_USES_MARKS = (SMamba, ITransformer)  # variate-token models read the timestamp tokens, as in their papers


def build_forecaster(
    name: str, seq_len: int, pred_len: int, period: int = 24, d_model: int = 128, d_ff: int = 128,
    e_layers: int = 2, d_state: int = 2, dropout: float = 0.1, chimera_patch_len: int = 8,
) -> nn.Module:
    """A benchmark model by name (``BENCH_MODELS``); sizes apply to the variate-token models and Chimera (d_ff
    aside: Chimera has no feed-forward network). ``chimera_patch_len``: steps per Chimera cell (1: every step)."""
    if name == "naive":
        return LastValue(seq_len, pred_len)
    if name == "seasonal_naive":
        return SeasonalNaive(seq_len, pred_len, period)
    if name == "dlinear":
        return DLinear(seq_len, pred_len)
    if name == "itransformer":
        return ITransformer(seq_len, pred_len, d_model=d_model, e_layers=e_layers, d_ff=d_ff, dropout=dropout)
    if name == "smamba":
        return SMamba(seq_len, pred_len, d_model=d_model, d_state=d_state, d_ff=d_ff, e_layers=e_layers, dropout=dropout)
    if name == "chimera":
        return Chimera(seq_len, pred_len, d_model=d_model, d_state=d_state, e_layers=e_layers, dropout=dropout,
                       patch_len=chimera_patch_len)
    raise ValueError(f"unknown forecaster {name!r}; expected one of {list(BENCH_MODELS)}")


def _predict(model: nn.Module, x, x_mark):
    if isinstance(model, _USES_MARKS) and x_mark.shape[-1]:
        return model(x, x_mark)
    return model(x)


@torch.no_grad()
def evaluate_forecaster(model: nn.Module, dataset: WindowDataset, batch_size: int = 256, device="cpu") -> dict:
    """MSE and MAE over every window of ``dataset`` (all steps and variates weighted alike)."""
    model.eval()
    se = ae = 0.0
    count = 0
    for x, y, x_mark in DataLoader(dataset, batch_size=batch_size):
        pred = _predict(model, x.to(device), x_mark.to(device)).float()
        y = y.to(device)
        se += F.mse_loss(pred, y, reduction="sum").item()
        ae += F.l1_loss(pred, y, reduction="sum").item()
        count += y.numel()
    return {"mse": se / count, "mae": ae / count}


def train_forecaster(
    model: nn.Module, data: ForecastData, epochs: int = 10, lr: float = 1e-3, batch_size: int = 32,
    patience: int = 3, steps_per_epoch: Optional[int] = None, seed: int = 0, device="cpu", progress: bool = True,
) -> dict:
    """Train ``model`` in place (best validation weights restored); returns the history.

    ``steps_per_epoch`` caps an epoch at that many random batches (drawn without replacement), to fit a
    CPU budget; None runs every training window once per epoch."""
    if not any(p.requires_grad for p in model.parameters()):
        return {"epochs_run": 0, "best_epoch": 0, "val_mse": [], "train_mse": [], "seconds": 0.0}
    gen = torch.Generator().manual_seed(seed)
    n_samples = None if steps_per_epoch is None else min(len(data.train), steps_per_epoch * batch_size)
    sampler = RandomSampler(data.train, num_samples=n_samples, generator=gen)
    loader = DataLoader(data.train, batch_size=batch_size, sampler=sampler, drop_last=True)
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    history = {"val_mse": [], "train_mse": [], "best_epoch": 0}
    best, best_state, waited = math.inf, copy.deepcopy(model.state_dict()), 0
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        total, steps = 0.0, 0
        bar = tqdm(loader, desc=f"{type(model).__name__} epoch {epoch + 1}/{epochs}", leave=False, disable=not progress)
        for x, y, x_mark in bar:
            loss = F.mse_loss(_predict(model, x.to(device), x_mark.to(device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, steps = total + loss.item(), steps + 1
            bar.set_postfix(mse=f"{total / steps:.4f}")
        val = evaluate_forecaster(model, data.val, device=device)["mse"]
        history["train_mse"].append(total / max(steps, 1))
        history["val_mse"].append(val)
        if val < best:
            best, best_state, waited, history["best_epoch"] = val, copy.deepcopy(model.state_dict()), 0, epoch + 1
        else:
            waited += 1
            if waited >= patience:
                break
        for group in opt.param_groups:  # 'type1': halve the learning rate after every epoch
            group["lr"] *= 0.5
    model.load_state_dict(best_state)
    history["epochs_run"] = len(history["val_mse"])
    history["seconds"] = time.perf_counter() - start
    return history


def plot_forecast(
    models: dict, data: ForecastData, path, window: Optional[int] = None, variate: int = 0, device="cpu",
) -> Path:
    """Plot the look-back, the truth and each model's forecast for one test window and one variate
    (standardised scale) to ``path`` (PNG). Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("plot_forecast needs matplotlib: pip install 'mamba-zoo[timeseries]'") from e
    if not 0 <= variate < len(data.columns):
        raise ValueError(f"variate must be in 0..{len(data.columns) - 1}, got {variate}")
    window = len(data.test) // 2 if window is None else window
    x, y, x_mark = data.test[window]
    L, H = data.seq_len, data.pred_len
    fig, ax = plt.subplots(figsize=(10, 3.5))
    ax.plot(range(L), x[:, variate], color="0.4", label="look-back")
    ax.plot(range(L, L + H), y[:, variate], color="black", label="truth")
    with torch.no_grad():
        for name, model in models.items():
            model.eval()
            pred = _predict(model, x[None].to(device), x_mark[None].to(device))[0, :, variate].cpu()
            ax.plot(range(L, L + H), pred, label=name)
    ax.axvline(L - 0.5, color="0.7", linestyle=":")
    ax.set_title(f"{data.name}: {data.columns[variate]}, test window {window} (standardised)")
    ax.set_xlabel("step")
    ax.legend(loc="upper left", fontsize=8, ncol=3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png"))
    plt.close(fig)
    return path


def format_table(result: dict) -> str:
    """The benchmark result as a Markdown table."""
    lines = [
        f"{result['dataset']} (look-back {result['seq_len']}, horizon {result['pred_len']}; standardised scale)",
        "",
        "| model | params | test MSE | test MAE | best val MSE | epochs | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        val = f"{r['val_mse']:.4f}" if r["val_mse"] is not None else "-"
        lines.append(
            f"| {r['model']} | {r['params']:,} | {r['test_mse']:.4f} | {r['test_mae']:.4f} | {val} | "
            f"{r['epochs_run']} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


# What each numeric argument of the benchmark allows (number_arg / check_fields keywords).
BENCH_LIMITS = dict(
    seq_len=dict(kind=int, low=1), pred_len=dict(kind=int, low=1), epochs=dict(kind=int, low=1),
    lr=dict(kind=float, low=0, low_open=True), batch_size=dict(kind=int, low=1), patience=dict(kind=int, low=1),
    steps_per_epoch=dict(kind=int, low=1, optional=True), d_model=dict(kind=int, low=1), d_ff=dict(kind=int, low=1),
    e_layers=dict(kind=int, low=1), d_state=dict(kind=int, low=1), seed=dict(kind=int, low=0),
    chimera_patch_len=dict(kind=int, low=1),
)


def run_forecast_benchmark(
    dataset: str = "epf_fr_be", seq_len: int = 96, pred_len: int = 96, models: Sequence[str] = BENCH_MODELS,
    epochs: int = 10, lr: float = 1e-3, batch_size: int = 32, patience: int = 3,
    steps_per_epoch: Optional[int] = None, d_model: int = 128, d_ff: int = 128, e_layers: int = 2,
    d_state: int = 2, time_marks: bool = True, seed: int = 0, device: str = "cpu", data: Optional[ForecastData] = None,
    output: Optional[str] = None, markdown: Optional[str] = None, plot: Optional[str] = None, progress: bool = True,
    command: Optional[str] = None, chimera_patch_len: int = 8,
) -> dict:
    """Train and test every model in ``models`` on one data set's windows; print and return the table.

    ``data`` overrides ``dataset`` (for a series made elsewhere). ``output`` / ``markdown`` / ``plot``:
    paths for the JSON result, the Markdown table and a forecast-vs-truth plot."""
    unknown = sorted(set(models) - set(BENCH_MODELS))
    if unknown:
        raise ValueError(f"unknown forecasters {unknown}; expected some of {list(BENCH_MODELS)}")
    check_fields("forecast bench", SimpleNamespace(**locals()), BENCH_LIMITS)
    resolve_device(device)
    for option, path in (("--output", output), ("--markdown", markdown), ("--plot", plot)):
        if path:  # before any training: a run is not thrown away because its results cannot be written
            check_output_file(path, option)
    if data is None:
        data = load_forecast_data(dataset, seq_len, pred_len, time_marks=time_marks)
    rows, trained = [], {}
    for name in models:
        torch.manual_seed(seed)
        model = build_forecaster(name, data.seq_len, data.pred_len, data.period, d_model, d_ff, e_layers, d_state,
                                 chimera_patch_len=chimera_patch_len)
        hist = train_forecaster(model, data, epochs, lr, batch_size, patience, steps_per_epoch, seed, device, progress)
        test = evaluate_forecaster(model, data.test, device=device)
        rows.append({
            "model": name, "params": sum(p.numel() for p in model.parameters()),
            "test_mse": test["mse"], "test_mae": test["mae"],
            "val_mse": min(hist["val_mse"]) if hist["val_mse"] else None,
            "epochs_run": hist["epochs_run"], "best_epoch": hist["best_epoch"], "seconds": hist["seconds"],
        })
        trained[name] = model
        if progress:
            print(f"{name}: test MSE {test['mse']:.4f} MAE {test['mae']:.4f}", file=sys.stderr)
    result = {
        "dataset": data.name, "columns": data.columns, "seq_len": data.seq_len, "pred_len": data.pred_len,
        "split": {"train_windows": len(data.train), "val_windows": len(data.val), "test_windows": len(data.test),
                  "row_borders": data.borders},
        "time_marks": bool(data.train.marks.shape[1]), "period": data.period,
        "settings": {"epochs": epochs, "lr": lr, "lr_schedule": "halved every epoch", "batch_size": batch_size,
                     "patience": patience, "steps_per_epoch": steps_per_epoch, "d_model": d_model, "d_ff": d_ff,
                     "e_layers": e_layers, "d_state": d_state, "seed": seed,
                     **({"chimera_patch_len": chimera_patch_len} if "chimera" in models else {})},
        "rows": rows, "device": device, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.machine(), "command": command,
    }
    table = format_table(result)
    print(table)
    if output:
        write_text_atomic(output, json.dumps(result, indent=2) + "\n")
    if markdown:
        write_text_atomic(markdown, table + (f"\n\nCommand: `{command}`\n" if command else "\n"))
    if plot:
        plot_forecast(trained, data, plot, device=device)
    return result


def add_cli(subparsers) -> None:
    def limit(name: str):
        return number_arg(**BENCH_LIMITS[name])

    p = subparsers.add_parser("forecast", help="multivariate forecasting on series shipped by installed packages")
    sub = p.add_subparsers(dest="forecast_command", required=True)
    sub.add_parser("datasets", help="list the available series").set_defaults(func=_cli_datasets)
    b = sub.add_parser("bench", help="train S-Mamba, Chimera and the baselines the same way on one series and compare")
    b.add_argument("--dataset", default="epf_fr_be", choices=list_series())
    b.add_argument("--models", nargs="+", default=list(BENCH_MODELS), choices=BENCH_MODELS)
    b.add_argument("--seq-len", type=limit("seq_len"), default=96)
    b.add_argument("--pred-len", type=limit("pred_len"), default=96)
    b.add_argument("--epochs", type=limit("epochs"), default=10)
    b.add_argument("--lr", type=limit("lr"), default=1e-3)
    b.add_argument("--batch-size", type=limit("batch_size"), default=32)
    b.add_argument("--patience", type=limit("patience"), default=3)
    b.add_argument("--steps-per-epoch", type=limit("steps_per_epoch"), default=None, help="cap each epoch at this many random batches")
    b.add_argument("--d-model", type=limit("d_model"), default=128)
    b.add_argument("--d-ff", type=limit("d_ff"), default=128)
    b.add_argument("--e-layers", type=limit("e_layers"), default=2)
    b.add_argument("--d-state", type=limit("d_state"), default=2)
    b.add_argument("--chimera-patch-len", type=limit("chimera_patch_len"), default=8,
                   help="Chimera's cells: patches of this many steps along time (1: every step is a cell)")
    b.add_argument("--no-time-marks", action="store_true", help="no timestamp tokens for the variate-token models")
    b.add_argument("--seed", type=limit("seed"), default=0)
    b.add_argument("--device", default="cpu")
    b.add_argument("--output", default=None, help="write the result as JSON here")
    b.add_argument("--markdown", default=None, help="write the table as Markdown here")
    b.add_argument("--plot", default=None, help="write a forecast-vs-truth PNG here (needs matplotlib)")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.set_defaults(func=_cli_bench)


def _cli_datasets(args: argparse.Namespace) -> int:
    print("\n".join(list_series()))
    return 0


def _cli_bench(args: argparse.Namespace) -> int:
    run_forecast_benchmark(
        args.dataset, args.seq_len, args.pred_len, args.models, args.epochs, args.lr, args.batch_size, args.patience,
        args.steps_per_epoch, args.d_model, args.d_ff, args.e_layers, args.d_state, not args.no_time_marks, args.seed,
        args.device, output=args.output, markdown=args.markdown, plot=args.plot, progress=not args.quiet,
        command=getattr(args, "command_line", None) or "zoo " + shlex.join(sys.argv[1:]),
        chimera_patch_len=args.chimera_patch_len,
    )
    return 0


if __name__ == "__main__":  # `python -m zoo.tasks.forecasting bench ...`, the same as `zoo forecast bench ...`
    parser = argparse.ArgumentParser(prog="python -m zoo.tasks.forecasting")
    add_cli(parser.add_subparsers(dest="command", required=True))
    cli_args = parser.parse_args(["forecast", *sys.argv[1:]])
    cli_args.command_line = "python -m zoo.tasks.forecasting " + shlex.join(sys.argv[1:])
    sys.exit(cli_args.func(cli_args))
