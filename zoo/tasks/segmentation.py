"""Semantic segmentation: UperNet on a zoo backbone, trained on generated Shapes2D images, scored by mIoU.

``zoo segment --backbone vmamba_tiny --backbone-kwargs dims=16 depths='(1,1,2,1)'`` trains end to end
(AdamW, per-step cosine after a linear warmup, pixel cross-entropy) and reports the validation mIoU over
the four classes (background included) and each class's IoU.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from zoo.tasks.classification import parse_model_kwargs
from zoo.tasks.engine import cosine_with_warmup, param_groups_weight_decay
from zoo.tasks.engine import check_fields, check_output_file, number_arg, resolve_device, write_text_atomic

IGNORE_INDEX = 255


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts, rows the true class, columns the predicted one; pixels whose
    target is ``ignore_index`` are left out."""
    if pred.shape != target.shape:
        raise ValueError(f"confusion_matrix: prediction and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    keep = target != ignore_index
    pred, target = pred[keep].long(), target[keep].long()
    bad = (target < 0) | (target >= num_classes) | (pred < 0) | (pred >= num_classes)
    if bad.any():
        raise ValueError(f"confusion_matrix: labels must be in [0, {num_classes}) or {ignore_index}; got "
                         f"target {target[bad].unique().tolist()[:5]} / prediction {pred[bad].unique().tolist()[:5]}")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.view(num_classes, num_classes).cpu()


def iou_from_confusion(conf: torch.Tensor) -> Dict[str, Any]:
    """Per-class IoU = TP / (TP + FP + FN) (None for a class absent from both targets and predictions), their
    mean over the classes that have one (mIoU), and pixel accuracy."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    per_class = [(t / u).item() if u > 0 else None for t, u in zip(tp, union)]
    present = [v for v in per_class if v is not None]
    return dict(
        miou=sum(present) / len(present) if present else float("nan"),
        iou=per_class,
        pixel_accuracy=(tp.sum() / conf.sum()).item() if conf.sum() > 0 else float("nan"),
    )


@dataclass
class SegmentConfig:
    """Defaults: a 4-stage VMamba narrowed to widths 16-32-64-128 and depths 1-1-2-1 (the entry's stem,
    blocks and scan, at a size that trains in minutes on 2 CPU cores), UperNet width 64, 64x64 images."""

    backbone: str = "vmamba_tiny"
    backbone_kwargs: Dict[str, Any] = field(default_factory=lambda: dict(dims=16, depths=(1, 1, 2, 1)))
    out_indices: Optional[tuple] = None
    channels: int = 64
    img_size: int = 64
    num_train: int = 512
    num_val: int = 128
    epochs: int = 4
    batch_size: int = 16
    lr: float = 2e-3
    min_lr: float = 1e-5
    warmup_epochs: float = 0.5
    weight_decay: float = 0.01
    pretrained: bool = False
    device: str = "cpu"
    seed: int = 0
    progress: bool = True
    output: Optional[str] = None


# What each numeric field allows (number_arg / check_fields keywords): checked by train() and by the CLI's parser.
LIMITS: Dict[str, Dict[str, Any]] = dict(
    channels=dict(kind=int, low=1), img_size=dict(kind=int, low=1), num_train=dict(kind=int, low=1),
    num_val=dict(kind=int, low=1), epochs=dict(kind=int, low=1), batch_size=dict(kind=int, low=1),
    lr=dict(kind=float, low=0, low_open=True), min_lr=dict(kind=float, low=0), warmup_epochs=dict(kind=float, low=0),
    weight_decay=dict(kind=float, low=0), seed=dict(kind=int, low=0),
)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, num_classes: int, device: torch.device) -> Dict[str, Any]:
    model.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    start = time.perf_counter()
    images = 0
    for x, y in loader:
        pred = model(x.to(device)).argmax(1)
        conf += confusion_matrix(pred, y.to(device), num_classes)
        images += len(x)
    seconds = time.perf_counter() - start
    return {**iou_from_confusion(conf), "images": images, "seconds": seconds, "images_per_s": images / seconds}


def train(cfg: SegmentConfig, command: Optional[str] = None) -> Dict[str, Any]:
    """Train UperNet on ``cfg.backbone`` on Shapes2D and evaluate it; returns the result dict (also written to
    ``cfg.output`` as JSON when given)."""
    from zoo.data.shapes2d import Shapes2D
    from zoo.models.vision.upernet import SegmentationModel

    wall_start = time.perf_counter()
    check_fields("segment", cfg, LIMITS)
    if cfg.min_lr > cfg.lr:
        raise ValueError(f"segment: min_lr must be <= lr (the cosine ends there), got min_lr {cfg.min_lr:g} and lr {cfg.lr:g}")
    device = resolve_device(cfg.device)
    if cfg.output:  # before any training: a run is not thrown away because its result cannot be written
        check_output_file(cfg.output, "--out")
    torch.manual_seed(cfg.seed)
    train_set = Shapes2D(cfg.num_train, cfg.img_size, seed=cfg.seed)
    val_set = Shapes2D(cfg.num_val, cfg.img_size, seed=cfg.seed + 10_000)  # disjoint seeds: other images
    num_classes = Shapes2D.num_classes
    model = SegmentationModel(
        cfg.backbone, num_classes, out_indices=cfg.out_indices, channels=cfg.channels, pretrained=cfg.pretrained,
        **cfg.backbone_kwargs,
    ).to(device)
    params = sum(p.numel() for p in model.parameters())
    backbone_params = sum(p.numel() for p in model.backbone.parameters())
    print(f"segment: UperNet(width {cfg.channels}) on {cfg.backbone}({cfg.backbone_kwargs}) -> {params / 1e6:.2f}M params "
          f"({backbone_params / 1e6:.2f}M backbone); Shapes2D {cfg.num_train} train / {cfg.num_val} val at "
          f"{cfg.img_size}x{cfg.img_size}; {cfg.epochs} epochs, batch {cfg.batch_size}, {cfg.device}", flush=True)

    loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(cfg.seed))
    if len(loader) == 0:
        raise ValueError(f"segment: num_train ({cfg.num_train}) must be at least the batch size ({cfg.batch_size})")
    val_loader = DataLoader(val_set, batch_size=cfg.batch_size)
    optimizer = torch.optim.AdamW(param_groups_weight_decay(model, cfg.weight_decay), lr=cfg.lr)
    total = len(loader) * cfg.epochs
    scheduler = cosine_with_warmup(optimizer, total, round(cfg.warmup_epochs * len(loader)), cfg.min_lr)

    history = []
    train_seconds = 0.0
    for epoch in range(cfg.epochs):
        model.train()
        loss_sum, seen = 0.0, 0
        start = time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", disable=not cfg.progress)
        for step, (x, y) in enumerate(bar):
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(model(x), y, ignore_index=IGNORE_INDEX)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"segment: loss is {loss.item()} at epoch {epoch + 1}, step {step + 1}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(x)
            seen += len(x)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.1e}")
        train_seconds += time.perf_counter() - start
        ev = evaluate(model, val_loader, num_classes, device)
        history.append(dict(epoch=epoch + 1, train_loss=loss_sum / seen, val_miou=ev["miou"]))
        print(f"epoch {epoch + 1}: train loss {loss_sum / seen:.4f}, val mIoU {ev['miou']:.4f}", flush=True)

    result = dict(
        task="segmentation", data="shapes2d", classes=list(Shapes2D.classes), backbone=cfg.backbone, head="upernet",
        params=params, backbone_params=backbone_params, miou=ev["miou"],
        iou=dict(zip(Shapes2D.classes, ev["iou"])), pixel_accuracy=ev["pixel_accuracy"], history=history,
        train_images_per_s=cfg.epochs * len(loader) * cfg.batch_size / train_seconds, eval_images_per_s=ev["images_per_s"],
        train_seconds=train_seconds, wall_seconds=time.perf_counter() - wall_start, device=str(device),
        threads=torch.get_num_threads(), torch=torch.__version__, config=asdict(cfg), command=command,
    )
    if cfg.output:
        write_text_atomic(cfg.output, json.dumps(result, indent=1) + "\n")
    return result


def add_cli(subparsers) -> None:
    d = SegmentConfig()

    def limit(name: str):
        return number_arg(**LIMITS[name])

    p = subparsers.add_parser(
        "segment", help="train UperNet on a zoo backbone on generated Shapes2D images and report mIoU",
        description="Train a UperNet segmentation model (zoo.models.vision.upernet) on a features_only zoo backbone "
                    "on Shapes2D (generated circles / rectangles / triangles with their masks) and print the "
                    "validation mIoU.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--backbone", default=d.backbone, help="zoo entry with features_only support (vmamba_*, vim_*, ...)")
    p.add_argument("--backbone-kwargs", nargs="*", default=None, metavar="KEY=VALUE",
                   help=f"create_model keyword arguments for the backbone (default: {d.backbone_kwargs} for "
                        f"{d.backbone}, none for other backbones; given without values: none)")
    p.add_argument("--out-indices", type=int, nargs="+", default=None, help="backbone maps (default: all stages / 4 blocks)")
    p.add_argument("--channels", type=limit("channels"), default=d.channels, help="UperNet width")
    p.add_argument("--img-size", type=limit("img_size"), default=d.img_size, help="image side")
    p.add_argument("--num-train", type=limit("num_train"), default=d.num_train, help="generated training images")
    p.add_argument("--num-val", type=limit("num_val"), default=d.num_val, help="generated validation images")
    p.add_argument("--epochs", type=limit("epochs"), default=d.epochs)
    p.add_argument("--batch-size", type=limit("batch_size"), default=d.batch_size)
    p.add_argument("--lr", type=limit("lr"), default=d.lr, help="peak learning rate (AdamW)")
    p.add_argument("--weight-decay", type=limit("weight_decay"), default=d.weight_decay)
    p.add_argument("--pretrained", action="store_true", help="start the backbone from the entry's weights")
    p.add_argument("--device", default=d.device)
    p.add_argument("--seed", type=limit("seed"), default=d.seed)
    p.add_argument("--threads", type=number_arg(int, 1), default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="write the result JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cli_segment)


def _cli_segment(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    d = SegmentConfig()
    cfg = SegmentConfig(
        backbone=args.backbone,
        backbone_kwargs=parse_model_kwargs(args.backbone_kwargs) if args.backbone_kwargs is not None
        else d.backbone_kwargs if args.backbone == d.backbone else {},
        out_indices=tuple(args.out_indices) if args.out_indices else None, channels=args.channels,
        img_size=args.img_size, num_train=args.num_train, num_val=args.num_val, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, pretrained=args.pretrained,
        device=args.device, seed=args.seed, progress=not args.no_progress, output=args.out,
    )
    result = train(cfg, command=args.command_line)
    per_class = ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} -" for k, v in result["iou"].items())
    print(f"val mIoU {result['miou']:.4f} ({per_class}); pixel accuracy {result['pixel_accuracy']:.4f}; "
          f"wall time {result['wall_seconds']:.1f} s")
    if cfg.output:
        print(f"wrote {cfg.output}")
    return 0
