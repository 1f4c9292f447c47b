"""Point-cloud classification on Shapes3D (zoo.data.shapes3d): PointMamba and Point Cloud Mamba
against a PointNet-style baseline, trained and evaluated the same way.

Every model gets the same clouds, augmentation (PointMamba's random anisotropic scale in [2/3, 3/2]
and shift in [-0.2, 0.2]), optimiser (AdamW, weight decay 0.05, cosine schedule with one warm-up
epoch, gradient clipping at 10 as in PointMamba's fine-tuning configs), epochs, batch size and seeds.
``zoo points bench`` prints the table and can write it as JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from zoo.core.selective_scan.op import _resolve as _resolve_scan  # which scan path the run used, for the record
from zoo.data.shapes3d import CLASSES, make_shapes3d
from zoo.models.point.pcm import PointCloudMamba
from zoo.models.point.pointmamba import PointMamba
from zoo.tasks.engine import check_float, check_int, check_output_file, number_arg, resolve_device, write_text_atomic


class PointNetBaseline(nn.Module):
    """PointNet without its input/feature transforms (Qi et al., 2017): a shared per-point MLP,
    global max pool, MLP classifier."""

    def __init__(self, num_classes: int, widths: Sequence[int] = (64, 128, 256), head_hidden: int = 128, drop: float = 0.5):
        super().__init__()
        layers, c = [], 3
        for w in widths:
            layers += [nn.Conv1d(c, w, 1), nn.BatchNorm1d(w), nn.ReLU(inplace=True)]
            c = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Linear(c, head_hidden), nn.BatchNorm1d(head_hidden), nn.ReLU(inplace=True), nn.Dropout(drop),
            nn.Linear(head_hidden, num_classes),
        )

    def forward(self, pts: torch.Tensor) -> torch.Tensor:
        if pts.dim() != 3 or pts.shape[-1] != 3:
            raise ValueError(f"PointNetBaseline: expected points of shape (batch, num_points, 3), got {tuple(pts.shape)}")
        return self.head(self.features(pts.transpose(1, 2)).amax(dim=2))


def build_bench_model(name: str, num_classes: int, num_points: int) -> nn.Module:
    """The benchmark models: small enough to train on a CPU in minutes."""
    if name == "pointmamba":
        # Patch count scales with the cloud as in the paper (1024 points -> 64 patches).
        return PointMamba(num_classes=num_classes, trans_dim=96, depth=4, num_group=max(8, num_points // 16),
                          group_size=16, drop_path_rate=0.1, head_hidden=128)
    if name == "pcm":
        # PCM-Tiny's layout (four stages, 1+1+2+2 layers over the six CTS orders) at width 64.
        return PointCloudMamba(num_classes=num_classes, embed_dim=64, mamba_blocks=(1, 1, 2, 2),
                               orders=("xyz", "xzy", "yxz", "yzx", "zxy", "zyx"), prompt_dim=64)
    if name == "pointnet":
        return PointNetBaseline(num_classes)
    raise ValueError(f"points task: unknown model {name!r}; choose from {BENCH_MODELS}")


BENCH_MODELS = ("pointmamba", "pcm", "pointnet")


def augment(pts: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """PointMamba's PointcloudScaleAndTranslate: per-cloud anisotropic scale and shift."""
    b = pts.shape[0]
    scale = torch.empty(b, 1, 3).uniform_(2 / 3, 3 / 2, generator=gen)
    shift = torch.empty(b, 1, 3).uniform_(-0.2, 0.2, generator=gen)
    return pts * scale.to(pts) + shift.to(pts)


@torch.no_grad()
def evaluate(model: nn.Module, points: torch.Tensor, labels: torch.Tensor, batch_size: int, device) -> Dict[str, float]:
    model.eval()
    preds = torch.cat([model(points[i : i + batch_size].to(device)).argmax(-1).cpu() for i in range(0, len(points), batch_size)])
    per_class = [float((preds[labels == c] == c).float().mean()) for c in labels.unique().tolist()]
    return {"overall_accuracy": float((preds == labels).float().mean()), "mean_class_accuracy": float(np.mean(per_class))}


def train_model(
    model: nn.Module, points: torch.Tensor, labels: torch.Tensor, epochs: int, batch_size: int, lr: float, seed: int,
    device, desc: str = "",
) -> float:
    """Trains in place; returns wall-clock seconds."""
    gen = torch.Generator().manual_seed(seed)
    model.to(device).train()
    decay, no_decay = [], []
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    for n, p in model.named_parameters():
        (no_decay if p.dim() <= 1 or n in skip else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    steps_per_epoch = math.ceil(len(points) / batch_size)
    total, warm = epochs * steps_per_epoch, steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))
    )
    start = time.perf_counter()
    bar = tqdm(total=total, desc=desc, leave=False)
    for _ in range(epochs):
        order = torch.randperm(len(points), generator=gen)
        for i in range(0, len(points), batch_size):
            idx = order[i : i + batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            x = augment(points[idx], gen).to(device)
            loss = F.cross_entropy(model(x), labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return time.perf_counter() - start


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(torch.device(device)) if torch.device(device).type == "cuda" else "cpu"


def run_points_benchmark(
    models: Sequence[str], seeds: Sequence[int], epochs: int, train_per_class: int, test_per_class: int, num_points: int,
    batch_size: int = 32, lr: float = 1e-3, device: str = "cpu", output: Optional[str] = None, command: str = "",
    save_weights: Optional[str] = None,
) -> dict:
    """Train and test each model for each seed; ``save_weights`` (one model, one seed) writes the trained state dict."""
    if save_weights and (len(models) != 1 or len(seeds) != 1):
        raise ValueError(f"points bench: --save-weights needs one model and one seed, got models {list(models)} "
                         f"and seeds {list(seeds)}")
    for name, value, low in (("epochs", epochs, 1), ("train_per_class", train_per_class, 1),
                             ("test_per_class", test_per_class, 1), ("num_points", num_points, 1), ("batch_size", batch_size, 1)):
        check_int(f"points bench: {name}", value, low)
    for seed in seeds:
        check_int("points bench: seed", seed, 0)
    check_float("points bench: lr", lr, 0, low_open=True)
    resolve_device(device)
    for option, path in (("--output", output), ("--save-weights", save_weights)):
        if path:  # before any training: a run is not thrown away because its results cannot be written
            check_output_file(path, option)
    train_x, train_y = make_shapes3d(train_per_class, num_points, seed=1000)
    test_x, test_y = make_shapes3d(test_per_class, num_points, seed=2000)
    rows: List[dict] = []
    for name in models:
        runs = []
        for seed in seeds:
            torch.manual_seed(seed)
            model = build_bench_model(name, len(CLASSES), num_points)
            secs = train_model(model, train_x, train_y, epochs, batch_size, lr, seed, device, desc=f"{name} seed {seed}")
            runs.append({"seed": seed, "train_seconds": round(secs, 1), **evaluate(model, test_x, test_y, 64, device)})
            tqdm.write(f"{name} seed {seed}: OA {runs[-1]['overall_accuracy']:.4f}  mAcc {runs[-1]['mean_class_accuracy']:.4f}  ({secs:.0f}s)")
        oa = [r["overall_accuracy"] for r in runs]
        macc = [r["mean_class_accuracy"] for r in runs]
        rows.append({
            "model": name, "params": sum(p.numel() for p in model.parameters()),
            "overall_accuracy_mean": float(np.mean(oa)), "overall_accuracy_std": float(np.std(oa)),
            "mean_class_accuracy_mean": float(np.mean(macc)), "runs": runs,
        })
    result = {
        "task": "shapes3d point-cloud classification (zoo.data.shapes3d)",
        "command": command,
        "classes": list(CLASSES),
        "data": {"train_per_class": train_per_class, "test_per_class": test_per_class, "num_points": num_points,
                 "train_seed": 1000, "test_seed": 2000},
        "training": {"epochs": epochs, "batch_size": batch_size, "lr": lr, "optimizer": "AdamW wd 0.05, cosine, 1 warm-up epoch",
                     "seeds": list(seeds), "device": device, "device_name": _device_name(device), "torch": torch.__version__,
                     "selective_scan": _resolve_scan("auto", torch.device(device)).__name__},
        "results": rows,
    }
    print(f"\n{'model':<12}{'params':>10}{'OA':>16}{'mAcc':>10}")
    for r in rows:
        print(f"{r['model']:<12}{r['params']:>10,}{r['overall_accuracy_mean']:>10.4f} ± {r['overall_accuracy_std']:.4f}"
              f"{r['mean_class_accuracy_mean']:>10.4f}")
    if output:
        write_text_atomic(output, json.dumps(result, indent=2) + "\n")
    if save_weights:
        from zoo.hub import save_state_dict

        save_state_dict(model, save_weights)
    return result


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("points", help="point-cloud classification on generated Shapes3D")
    sub = p.add_subparsers(dest="points_command", required=True)
    b = sub.add_parser("bench", help="train PointMamba and a PointNet-style baseline the same way and compare")
    b.add_argument("--models", nargs="+", default=list(BENCH_MODELS), choices=BENCH_MODELS)
    b.add_argument("--seeds", nargs="+", type=number_arg(int, 0), default=[0])
    b.add_argument("--epochs", type=number_arg(int, 1), default=8)
    b.add_argument("--train-per-class", type=number_arg(int, 1), default=120)
    b.add_argument("--test-per-class", type=number_arg(int, 1), default=60)
    b.add_argument("--num-points", type=number_arg(int, 1), default=512)
    b.add_argument("--batch-size", type=number_arg(int, 1), default=32)
    b.add_argument("--lr", type=number_arg(float, 0, low_open=True), default=1e-3)
    b.add_argument("--device", default="cpu")
    b.add_argument("--output", default=None, help="write the table as JSON here")
    b.add_argument("--save-weights", default=None, help="write the trained model's state dict here (safetensors; one model, one seed)")
    b.set_defaults(func=_cli_bench)


def _cli_bench(args: argparse.Namespace) -> int:
    run_points_benchmark(args.models, args.seeds, args.epochs, args.train_per_class, args.test_per_class, args.num_points,
                         args.batch_size, args.lr, args.device, args.output,
                         command=getattr(args, "command_line", None) or "zoo " + shlex.join(sys.argv[1:]),
                         save_weights=args.save_weights)
    return 0


if __name__ == "__main__":  # `python -m zoo.tasks.point_classification bench ...`, the same as `zoo points bench ...`
    parser = argparse.ArgumentParser(prog="python -m zoo.tasks.point_classification")
    add_cli(parser.add_subparsers(dest="command", required=True))
    cli_args = parser.parse_args(["points", *sys.argv[1:]])
    cli_args.command_line = "python -m zoo.tasks.point_classification " + shlex.join(sys.argv[1:])
    sys.exit(cli_args.func(cli_args))
