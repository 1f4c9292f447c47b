"""Image classification: fine-tune a zoo entry on an embedded dataset and evaluate top-1 accuracy.

The recipe is timm's: AdamW without weight decay on 1-D parameters and on the model's
``no_weight_decay()`` names, per-step cosine learning rate after a linear warmup, optional label
smoothing, gradient-norm clipping, optional bfloat16 autocast.
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

@dataclass
class FinetuneConfig:
    """The defaults are the README's main job: vim_tiny's width (embed 192, d_state 16) on 32x32 digits in
    8x8 patches (16 tokens + the class token), with 6 blocks instead of the entry's 24 so that training
    takes minutes on 2 CPU cores (the CPU scan's cost grows with tokens x blocks)."""

    model: str = "vim_tiny"
    data: str = "digits"
    epochs: int = 6
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    clip_grad: Optional[float] = 1.0
    img_size: int = 32
    patch_size: Optional[int] = 8
    depth: Optional[int] = 6
    drop_path: float = 0.0
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    pretrained: bool = False
    checkpoint_path: Optional[str] = None
    device: str = "cpu"
    amp: bool = False
    seed: int = 0
    limit_train_batches: Optional[int] = None
    output: Optional[str] = None
    progress: bool = True


def param_groups_weight_decay(model: nn.Module, weight_decay: float):
    """Two AdamW groups: decayed weights, and undecayed 1-D params (norms, biases, D) plus the
    names in ``model.no_weight_decay()`` (position embedding, class token)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_with_warmup(optimizer, total_steps: int, warmup_steps: int, min_lr: float):
    """Per-step schedule: linear from ~0 to the base lr over warmup_steps, then cosine to min_lr."""
    base = optimizer.param_groups[0]["lr"]

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return (min_lr + (base - min_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))) / base

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def model_kwargs_for(cfg: FinetuneConfig, num_classes: int) -> Dict[str, Any]:
    """The keyword arguments create_model gets (also stored with the checkpoint to rebuild it)."""
    kwargs: Dict[str, Any] = dict(num_classes=num_classes, img_size=cfg.img_size, drop_path_rate=cfg.drop_path)
    if cfg.patch_size is not None:
        # Vim takes the patch stride separately; equal stride gives non-overlapping patches.
        kwargs.update(patch_size=cfg.patch_size, stride=cfg.patch_size)
    if cfg.depth is not None:
        kwargs["depth"] = cfg.depth
    kwargs.update(cfg.model_kwargs)
    return kwargs


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, amp: bool = False) -> Dict[str, float]:
    """Top-1 accuracy and images per second over a loader."""
    model.eval()
    correct = total = 0
    start = time.perf_counter()
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(images)
        correct += (logits.argmax(-1) == labels).sum().item()
        total += labels.numel()
    seconds = time.perf_counter() - start
    return {"accuracy": correct / total, "images": total, "seconds": seconds, "images_per_s": total / seconds}


def train_one_epoch(model, loader, optimizer, scheduler, device, cfg: FinetuneConfig, epoch: int) -> Dict[str, float]:
    model.train()
    steps = len(loader) if cfg.limit_train_batches is None else min(len(loader), cfg.limit_train_batches)
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", disable=not cfg.progress, leave=True)
    loss_sum = correct = seen = 0
    start = time.perf_counter()  # images/s counts everything: loading, augmentation, forward, backward, step
    for step, (images, labels) in enumerate(loader):
        if step == steps:
            break
        images, labels = images.to(device), labels.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"finetune: loss is {loss.item()} at epoch {epoch + 1}, step {step + 1}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        optimizer.step()
        scheduler.step()
        seconds = time.perf_counter() - start
        n = labels.numel()
        loss_sum += loss.item() * n
        correct += (logits.argmax(-1) == labels).sum().item()
        seen += n
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}",
                        lr=f"{optimizer.param_groups[0]['lr']:.2e}", img_s=f"{seen / seconds:.1f}")
        bar.update()
    bar.close()
    return {"loss": loss_sum / seen, "accuracy": correct / seen, "images": seen, "seconds": seconds}


def save_checkpoint(model: nn.Module, path: Path, metadata: Dict[str, Any]) -> None:
    """safetensors state dict; ``metadata`` (JSON-encoded values) says how to rebuild the model."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={k: json.dumps(v) for k, v in metadata.items()})


def finetune(cfg: FinetuneConfig, command: Optional[str] = None) -> Dict[str, Any]:
    """Fine-tune ``cfg.model`` on ``cfg.data`` and evaluate it on the test split; returns the result dict
    (also written to ``<output>/result.json`` with the checkpoint ``<output>/model.safetensors``)."""
    import zoo
    from timm.data import resolve_data_config

    from zoo.data import create_dataset, dataset_class

    wall_start = time.perf_counter()
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise ValueError(f"finetune: epochs and batch size must be >= 1, got {cfg.epochs} and {cfg.batch_size}")
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)

    kwargs = model_kwargs_for(cfg, dataset_class(cfg.data).num_classes)
    model = zoo.create_model(cfg.model, pretrained=cfg.pretrained, checkpoint_path=cfg.checkpoint_path, **kwargs)
    model.to(device)
    data_cfg = resolve_data_config({}, model=model)  # mean / std from the entry's pretrained_cfg
    train_set = create_dataset(cfg.data, "train", img_size=cfg.img_size, mean=data_cfg["mean"], std=data_cfg["std"], seed=cfg.seed)
    test_set = create_dataset(cfg.data, "test", img_size=cfg.img_size, mean=data_cfg["mean"], std=data_cfg["std"], seed=cfg.seed)
    train_loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, drop_last=len(train_set) >= cfg.batch_size,
                              generator=torch.Generator().manual_seed(cfg.seed))
    test_loader = DataLoader(test_set, batch_size=max(cfg.batch_size, 128))

    params = sum(p.numel() for p in model.parameters())
    print(describe_run(cfg, kwargs, params, len(train_set), len(test_set)), flush=True)

    optimizer = torch.optim.AdamW(param_groups_weight_decay(model, cfg.weight_decay), lr=cfg.lr)
    steps_per_epoch = len(train_loader) if cfg.limit_train_batches is None else min(len(train_loader), cfg.limit_train_batches)
    total_steps = steps_per_epoch * cfg.epochs
    scheduler = cosine_with_warmup(optimizer, total_steps, round(cfg.warmup_epochs * steps_per_epoch), cfg.min_lr)

    train_images = 0
    train_seconds = 0.0
    history = []
    for epoch in range(cfg.epochs):
        stats = train_one_epoch(model, train_loader, optimizer, scheduler, device, cfg, epoch)
        train_images += stats["images"]
        train_seconds += stats["seconds"]
        history.append({"epoch": epoch + 1, "train_loss": stats["loss"], "train_accuracy": stats["accuracy"]})
    ev = evaluate(model, test_loader, device, cfg.amp)

    result: Dict[str, Any] = dict(
        task="classification", model=cfg.model, data=cfg.data, pretrained=cfg.pretrained, model_kwargs=kwargs,
        params=params, train_images=len(train_set), test_images=ev["images"], epochs=cfg.epochs,
        accuracy=ev["accuracy"], train_images_per_s=train_images / train_seconds, eval_images_per_s=ev["images_per_s"],
        train_seconds=train_seconds, eval_seconds=ev["seconds"], history=history,
        device=str(device), threads=torch.get_num_threads(), torch=torch.__version__, config=asdict(cfg), command=command,
    )
    if cfg.output:
        out = Path(cfg.output)
        out.mkdir(parents=True, exist_ok=True)
        save_checkpoint(model, out / "model.safetensors", {"model": cfg.model, "model_kwargs": kwargs})
        result["checkpoint"] = str(out / "model.safetensors")
    result["wall_seconds"] = time.perf_counter() - wall_start
    if cfg.output:
        (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def describe_run(cfg: FinetuneConfig, kwargs: Dict[str, Any], params: int, n_train: int, n_test: int) -> str:
    """What is about to run, stated plainly: the entry, the exact create_model call, where weights come from."""
    from zoo import model_info

    call = ", ".join([repr(cfg.model)] + [f"{k}={v!r}" for k, v in kwargs.items()])
    weights = (f"pretrained weights of {cfg.model}" if cfg.pretrained
               else f"checkpoint {cfg.checkpoint_path}" if cfg.checkpoint_path
               else "none: random initialisation, trained from scratch (no --pretrained)")
    return (f"finetune {cfg.model} on {cfg.data}: {n_train} train / {n_test} test images at {cfg.img_size}x{cfg.img_size}\n"
            f"  entry:   {model_info(cfg.model).get('description', cfg.model)}\n"
            f"  model:   create_model({call}) -> {params / 1e6:.2f}M params\n"
            f"  weights: {weights}\n"
            f"  train:   {cfg.epochs} epochs, batch {cfg.batch_size}, lr {cfg.lr:g}, device {cfg.device}, "
            f"{torch.get_num_threads()} threads")


def parse_model_kwargs(items) -> Dict[str, Any]:
    """``["depth=12", "d_state=8", "name=x"]`` -> dict; values are Python literals, else strings."""
    out: Dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--model-kwargs: expected key=value, got {item!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def add_cli(subparsers) -> None:
    d = FinetuneConfig()
    p = subparsers.add_parser(
        "finetune", help="fine-tune and evaluate an image model on an embedded dataset (the README's main job)",
        description=f"Fine-tune a zoo entry on an embedded dataset and print its top-1 accuracy and images/s. "
                    f"Defaults: {d.model} with depth {d.depth} (the entry has 24 blocks; fewer keep the job to minutes "
                    f"on 2 CPU cores) on {d.data} at {d.img_size}x{d.img_size} with {d.patch_size}x{d.patch_size} "
                    f"patches, trained from scratch unless --pretrained is given.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=d.model, help="zoo entry (see `zoo list`)")
    p.add_argument("--data", default=d.data, help="embedded dataset: digits")
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training split")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per step")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (AdamW)")
    p.add_argument("--min-lr", type=float, default=d.min_lr, help="learning rate at the end of the cosine")
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs, help="linear warmup length (may be fractional)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay on weights of 2+ dims")
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing, help="cross-entropy label smoothing")
    p.add_argument("--clip-grad", type=float, default=d.clip_grad, help="max gradient norm (0: no clipping)")
    p.add_argument("--img-size", type=int, default=d.img_size, help="image side after upsampling")
    p.add_argument("--patch-size", type=int, default=d.patch_size, help="patch size and stride")
    p.add_argument("--depth", type=int, default=d.depth, help="number of blocks (overrides the entry's)")
    p.add_argument("--drop-path", type=float, default=d.drop_path, help="stochastic depth rate")
    p.add_argument("--model-kwargs", nargs="+", default=[], metavar="KEY=VALUE",
                   help="more keyword arguments for create_model, e.g. embed_dim=96 d_state=8")
    p.add_argument("--pretrained", action="store_true", help="start from the entry's pretrained weights (needs them cached or a network)")
    p.add_argument("--checkpoint-path", default=None, help="start from this checkpoint file")
    p.add_argument("--device", default=d.device, help="torch device, e.g. cpu or cuda")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    p.add_argument("--seed", type=int, default=d.seed, help="seeds the initialisation, the split and the batch order")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (None: torch's choice)")
    p.add_argument("--limit-train-batches", type=int, default=None, help="train on at most this many batches per epoch")
    p.add_argument("--output", default=None, help="write result.json and model.safetensors into this folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the result dict as JSON")
    p.set_defaults(func=_cli_finetune)


def _cli_finetune(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = FinetuneConfig(
        model=args.model, data=args.data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, min_lr=args.min_lr,
        warmup_epochs=args.warmup_epochs, weight_decay=args.weight_decay, label_smoothing=args.label_smoothing,
        clip_grad=args.clip_grad, img_size=args.img_size, patch_size=args.patch_size, depth=args.depth,
        drop_path=args.drop_path, model_kwargs=parse_model_kwargs(args.model_kwargs), pretrained=args.pretrained,
        checkpoint_path=args.checkpoint_path, device=args.device, amp=args.amp, seed=args.seed,
        limit_train_batches=args.limit_train_batches, output=args.output, progress=not args.no_progress,
    )
    result = finetune(cfg, command=args.command_line)
    if args.json:
        print(json.dumps(result, indent=1))
    print(f"top-1 accuracy: {result['accuracy']:.4f} on {result['test_images']} {cfg.data} test images")
    print(f"images/s: train {result['train_images_per_s']:.1f}, eval {result['eval_images_per_s']:.1f}; "
          f"wall time {result['wall_seconds']:.1f} s (the job, without Python's start-up)")
    if cfg.output:
        print(f"wrote {Path(cfg.output) / 'result.json'} and {result['checkpoint']}")
    return 0
