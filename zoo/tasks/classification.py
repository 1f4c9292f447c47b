"""Image classification: fine-tune a zoo entry on an embedded dataset and evaluate top-1 accuracy.

The recipe is timm's: AdamW without weight decay on 1-D parameters and on the model's
``no_weight_decay()`` names, per-step cosine learning rate after a linear warmup, optional label
smoothing, gradient-norm clipping, optional bfloat16 / float16 autocast.

Under ``torchrun`` the same job runs data-parallel (DDP, or FSDP2 with ``--strategy fsdp``): each process
loads ``--batch-size`` images per step through a DistributedSampler, metrics are all-reduced, and only rank 0
prints, shows progress bars and writes files. Layer-wise lr decay, EMA of weights, gradient checkpointing
and checkpoint / resume are options; the machinery lives in :mod:`zoo.tasks.engine`.
"""
from __future__ import annotations

import argparse
import ast
import inspect
import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from zoo.registry import create_skeleton
from zoo.tasks.engine import (
    STRATEGIES, DistContext, ShardSampler, all_reduce_max, all_reduce_sum, atomic_write, autocast, backward_and_step,
    check_fields, cleanup_distributed, cosine_with_warmup, create_ema, create_grad_scaler, create_optimizer,
    full_model_state_dict, init_distributed, is_main_process, load_training_state, number_arg, prepare_output_dir,
    read_training_state, save_training_state, unwrap_model, wrap_model, write_text_atomic,
)
from zoo.tasks.engine import param_groups_weight_decay  # noqa: F401  (re-exported: moved to the engine)

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
    layer_shuffle: float = 0.0  # the last block's probability of the stochastic layer-wise token shuffle (ShuffleMamba)
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    pretrained: bool = False
    checkpoint_path: Optional[str] = None
    device: str = "cpu"
    amp: Union[bool, str] = False  # False: float32; True or "bf16": bfloat16 autocast; "fp16": float16 (+ GradScaler on CUDA)
    seed: int = 0
    limit_train_batches: Optional[int] = None
    output: Optional[str] = None
    progress: bool = True
    strategy: str = "ddp"  # under torchrun: "ddp" or "fsdp" (FSDP2 fully_shard); ignored in a single process
    grad_checkpointing: bool = False
    layer_decay: Optional[float] = None  # layer-wise lr decay through the model's group_matcher (None: off)
    ema_decay: Optional[float] = None  # EMA of weights with this decay, evaluated instead of the raw weights (None: off)
    save_every: int = 0  # write <output>/checkpoint-epochN.pt every this many epochs (0: none)
    resume: Optional[str] = None  # continue from a checkpoint-epochN.pt
    overwrite: bool = False  # replace the result of an earlier run in ``output``
    lora_rank: Optional[int] = None  # LoRA adapters of this rank on the mixer projections, the rest frozen (zoo.lora)
    lora_alpha: Optional[float] = None  # LoRA scale alpha / rank (None: alpha = 2 * rank)


# What each numeric field allows (number_arg / check_fields keywords): checked by finetune() and by the CLI's parser.
LIMITS: Dict[str, Dict[str, Any]] = dict(
    epochs=dict(kind=int, low=1), batch_size=dict(kind=int, low=1), lr=dict(kind=float, low=0, low_open=True),
    min_lr=dict(kind=float, low=0), warmup_epochs=dict(kind=float, low=0), weight_decay=dict(kind=float, low=0),
    label_smoothing=dict(kind=float, low=0, high=1, high_open=True), clip_grad=dict(kind=float, low=0, optional=True),
    img_size=dict(kind=int, low=1), patch_size=dict(kind=int, low=1, optional=True), depth=dict(kind=int, low=1, optional=True),
    drop_path=dict(kind=float, low=0, high=1, high_open=True), seed=dict(kind=int, low=0),
    layer_shuffle=dict(kind=float, low=0, high=1),
    limit_train_batches=dict(kind=int, low=1, optional=True),
    layer_decay=dict(kind=float, low=0, high=1, low_open=True, optional=True),
    ema_decay=dict(kind=float, low=0, high=1, high_open=True, optional=True), save_every=dict(kind=int, low=0),
    lora_rank=dict(kind=int, low=1, optional=True), lora_alpha=dict(kind=float, low=0, low_open=True, optional=True),
)
# An earlier run's files in --output: refused without --overwrite (checkpoints are expected when resuming).
RESULT_FILES = ("result.json", "model.safetensors")
CHECKPOINT_FILES = ("checkpoint-epoch*.pt",)


def model_kwargs_for(cfg: FinetuneConfig, num_classes: int) -> Dict[str, Any]:
    """The keyword arguments create_model gets (also stored with the checkpoint to rebuild it).

    The image and patch size go only to entries built for one input size (Vim); hierarchical entries
    (VMamba, EfficientVMamba) take any input and have no such arguments. The job prints what it passed."""
    kwargs: Dict[str, Any] = dict(num_classes=num_classes, drop_path_rate=cfg.drop_path)
    takes = inspect.signature(type(create_skeleton(cfg.model))).parameters
    if "img_size" in takes:
        kwargs["img_size"] = cfg.img_size
    if cfg.patch_size is not None and {"patch_size", "stride"} <= takes.keys():
        # Vim takes the patch stride separately; equal stride gives non-overlapping patches.
        kwargs.update(patch_size=cfg.patch_size, stride=cfg.patch_size)
    if cfg.depth is not None and "depth" in takes:
        kwargs["depth"] = cfg.depth
    if cfg.layer_shuffle:
        if "layer_shuffle" not in takes:
            raise ValueError(f"finetune: --layer-shuffle needs an entry with stacked scan blocks that takes "
                             f"layer_shuffle (Vim, PointMamba, S-Mamba, MambaMIL); {cfg.model} does not")
        kwargs["layer_shuffle"] = cfg.layer_shuffle
    kwargs.update(cfg.model_kwargs)
    return kwargs


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, amp: Union[bool, str] = False,
             num_valid: Optional[int] = None) -> Dict[str, float]:
    """Top-1 accuracy and images per second over a loader. ``num_valid``: count only the first this many
    samples of the stream (a :class:`~zoo.tasks.engine.ShardSampler` pads the shards to equal length)."""
    model.eval()
    correct = total = 0
    start = time.perf_counter()
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        with autocast(device, amp):
            logits = model(images)
        hits = logits.argmax(-1) == labels
        if num_valid is not None:
            hits = hits[: max(0, num_valid - total)]
        correct += hits.sum().item()
        total += hits.numel()
    seconds = time.perf_counter() - start
    return {"accuracy": correct / max(total, 1), "correct": correct, "images": total, "seconds": seconds,
            "images_per_s": total / seconds}


def train_one_epoch(model, loader, optimizer, scheduler, device, cfg: FinetuneConfig, epoch: int,
                    scaler=None, ema=None, show_progress: bool = True) -> Dict[str, float]:
    """One pass (at most ``limit_train_batches`` steps); the returned counts are this process's own."""
    model.train()
    steps = len(loader) if cfg.limit_train_batches is None else min(len(loader), cfg.limit_train_batches)
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", disable=not (cfg.progress and show_progress),
               leave=True)
    loss_sum = correct = seen = 0
    start = time.perf_counter()  # images/s counts everything: loading, augmentation, forward, backward, step
    for step, (images, labels) in enumerate(loader):
        if step == steps:
            break
        images, labels = images.to(device), labels.to(device)
        with autocast(device, cfg.amp):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"finetune: loss is {loss.item()} at epoch {epoch + 1}, step {step + 1}")
        backward_and_step(loss, model, optimizer, cfg.clip_grad, scaler)
        if ema is not None:
            ema.update(unwrap_model(model))
        scheduler.step()
        seconds = time.perf_counter() - start
        n = labels.numel()
        loss_sum += loss.item() * n
        correct += (logits.argmax(-1) == labels).sum().item()
        seen += n
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}",
                        lr=f"{max(g['lr'] for g in optimizer.param_groups):.2e}", img_s=f"{seen / seconds:.1f}")
        bar.update()
    bar.close()
    return {"loss_sum": loss_sum, "correct": correct, "images": seen, "seconds": seconds}


def save_checkpoint(state_dict: Dict[str, torch.Tensor], path: Path, metadata: Dict[str, Any]) -> None:
    """safetensors state dict (written atomically); ``metadata`` (JSON-encoded values) says how to rebuild the model."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={k: json.dumps(v) for k, v in metadata.items()}))


def write_result_set(out: Path, result: Dict[str, Any], weights: Dict[str, torch.Tensor], metadata: Dict[str, Any]) -> None:
    """``model.safetensors`` and ``result.json`` as one set: the old result goes first (a stale result never sits
    beside a new model), the model is renamed into place, the result last, which marks the set complete. Both
    carry the run's ``run_id``, and the result the model's sha256."""
    import hashlib

    (out / "result.json").unlink(missing_ok=True)
    save_checkpoint(weights, out / "model.safetensors", dict(metadata, run_id=result["run_id"]))
    result["checkpoint"] = str(out / "model.safetensors")
    result["checkpoint_sha256"] = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    write_text_atomic(out / "result.json", json.dumps(result, indent=1) + "\n")


def finetune(cfg: FinetuneConfig, command: Optional[str] = None) -> Dict[str, Any]:
    """Fine-tune ``cfg.model`` on ``cfg.data`` and evaluate it on the test split; returns the result dict
    (also written to ``<output>/result.json`` with the checkpoint ``<output>/model.safetensors``).
    Under torchrun every process runs this; the result (global metrics) is returned on every rank and
    only rank 0 writes files."""
    check_fields("finetune", cfg, LIMITS)
    if cfg.min_lr > cfg.lr:
        raise ValueError(f"finetune: min_lr must be <= lr (the cosine ends there), got min_lr {cfg.min_lr:g} and lr {cfg.lr:g}")
    if cfg.strategy not in STRATEGIES:
        raise ValueError(f"finetune: strategy must be one of {STRATEGIES}, got {cfg.strategy!r}")
    if cfg.save_every and not cfg.output:
        raise ValueError("finetune: --save-every writes checkpoints into --output, which is not set")
    if cfg.lora_rank is not None and cfg.layer_decay is not None:
        raise ValueError("finetune: --lora-rank cannot be combined with --layer-decay (the adapters are not in the "
                         "model's block groups)")
    if cfg.lora_alpha is not None and cfg.lora_rank is None:
        raise ValueError("finetune: --lora-alpha needs --lora-rank")
    ctx = init_distributed(cfg.device)
    try:
        if cfg.output:  # before any work: a run is not thrown away because its results cannot be written
            prepare_output_dir(cfg.output, cfg.overwrite, RESULT_FILES + (() if cfg.resume else CHECKPOINT_FILES))
        return _finetune(cfg, ctx, command)
    finally:
        cleanup_distributed(ctx)


def _finetune(cfg: FinetuneConfig, ctx: DistContext, command: Optional[str]) -> Dict[str, Any]:
    import zoo
    from timm.data import resolve_data_config
    from torch.utils.data.distributed import DistributedSampler

    from zoo.data import create_dataset, dataset_class

    wall_start = time.perf_counter()
    device = ctx.device
    state = read_training_state(cfg.resume) if cfg.resume else None  # fail early on a wrong file
    torch.manual_seed(cfg.seed)  # the same initialisation on every rank (FSDP shards it without a broadcast)

    kwargs = model_kwargs_for(cfg, dataset_class(cfg.data).num_classes)
    lora = None if cfg.lora_rank is None else dict(rank=cfg.lora_rank, alpha=cfg.lora_alpha or 2.0 * cfg.lora_rank)
    if state is not None and (state["extra"].get("model") != cfg.model or state["extra"].get("model_kwargs") != kwargs
                              or state["extra"].get("lora") != lora):
        raise ValueError(f"resume: {cfg.resume} holds {state['extra'].get('model')} with {state['extra'].get('model_kwargs')} "
                         f"and LoRA {state['extra'].get('lora')}, but the arguments build {cfg.model} with {kwargs} "
                         f"and LoRA {lora}")
    if lora is not None and ctx.distributed and cfg.strategy == "fsdp":
        raise ValueError("finetune: --lora-rank runs with --strategy ddp, not fsdp")
    model = zoo.create_model(cfg.model, pretrained=cfg.pretrained, checkpoint_path=cfg.checkpoint_path, **kwargs)
    model.to(device)
    if cfg.grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise ValueError(f"finetune: --grad-checkpointing needs set_grad_checkpointing(); {cfg.model} has none")
        model.set_grad_checkpointing(True)
    data_cfg = resolve_data_config({}, model=model)  # mean / std from the entry's pretrained_cfg
    if lora is not None:
        from zoo.lora import add_lora
        model = add_lora(model, lora["rank"], lora["alpha"])
    train_set = create_dataset(cfg.data, "train", img_size=cfg.img_size, mean=data_cfg["mean"], std=data_cfg["std"], seed=cfg.seed)
    test_set = create_dataset(cfg.data, "test", img_size=cfg.img_size, mean=data_cfg["mean"], std=data_cfg["std"], seed=cfg.seed)
    eval_batch = max(cfg.batch_size, 128)
    generator: Optional[torch.Generator] = None
    num_valid: Optional[int] = None
    if ctx.distributed:
        # Every rank gets len(train_set) // world images per epoch, reshuffled per epoch from (seed, epoch).
        train_sampler = DistributedSampler(train_set, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=cfg.seed,
                                           drop_last=True)
        train_loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=train_sampler,
                                  drop_last=len(train_sampler) >= cfg.batch_size)
        test_sampler = ShardSampler(len(test_set), ctx.rank, ctx.world_size)
        test_loader = DataLoader(test_set, batch_size=eval_batch, sampler=test_sampler)
        num_valid = test_sampler.num_valid
        torch.manual_seed(cfg.seed + ctx.rank)  # distinct augmentation and drop-path draws per rank
    else:
        generator = torch.Generator().manual_seed(cfg.seed)
        train_sampler = None
        train_loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, drop_last=len(train_set) >= cfg.batch_size,
                                  generator=generator)
        test_loader = DataLoader(test_set, batch_size=eval_batch)

    params = sum(p.numel() for p in model.parameters())
    if lora is not None:
        named = dict(model.named_parameters())
        lora["trainable_params"] = sum(p.numel() for p in named.values() if p.requires_grad)
        params = sum(p.numel() for n, p in named.items() if ".lora_" not in n and "modules_to_save" not in n)
    if ctx.is_main:
        print(describe_run(cfg, kwargs, params, len(train_set), len(test_set), ctx), flush=True)

    ema = create_ema(model, cfg.ema_decay, ctx, cfg.strategy) if cfg.ema_decay is not None else None
    model = wrap_model(model, ctx, cfg.strategy)
    optimizer = create_optimizer(unwrap_model(model), cfg.lr, cfg.weight_decay, cfg.layer_decay)
    steps_per_epoch = len(train_loader) if cfg.limit_train_batches is None else min(len(train_loader), cfg.limit_train_batches)
    total_steps = steps_per_epoch * cfg.epochs
    scheduler = cosine_with_warmup(optimizer, total_steps, round(cfg.warmup_epochs * steps_per_epoch), cfg.min_lr, base_lr=cfg.lr)
    scaler = create_grad_scaler(cfg.amp, device, cfg.strategy, ctx.distributed)

    start_epoch = 0
    train_images = 0
    train_seconds = 0.0
    history = []
    if state is not None:
        saved = state["extra"]
        start_epoch = load_training_state(state, ctx, model=model, optimizer=optimizer, scheduler=scheduler, ema=ema,
                                          scaler=scaler, generator=generator)
        history, train_images, train_seconds = list(saved["history"]), saved["train_images"], saved["train_seconds"]
        if ctx.is_main:
            notes = [state["rng_note"]] if state.get("rng_note") else []
            if saved["config"]["epochs"] != cfg.epochs:
                notes.append(f"the schedule now spans {cfg.epochs} epochs, the checkpoint's run {saved['config']['epochs']}")
            if ema is None and state.get("ema") is not None:
                notes.append("the checkpoint's EMA weights are not used: no --ema-decay")
            print(f"resumed from {cfg.resume}: {start_epoch} of {cfg.epochs} epochs done"
                  + "".join(f"; {n}" for n in notes), flush=True)
    out = Path(cfg.output) if cfg.output else None

    for epoch in range(start_epoch, cfg.epochs):
        if train_sampler is not None:
            train_sampler.set_epoch(epoch)
        stats = train_one_epoch(model, train_loader, optimizer, scheduler, device, cfg, epoch, scaler, ema, show_progress=ctx.is_main)
        loss_sum, correct, seen = all_reduce_sum([stats["loss_sum"], stats["correct"], stats["images"]], ctx)
        train_images += int(seen)
        train_seconds += all_reduce_max(stats["seconds"], ctx)
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_accuracy": correct / seen})
        if cfg.save_every and ((epoch + 1) % cfg.save_every == 0 or epoch + 1 == cfg.epochs):
            extra = dict(model=cfg.model, model_kwargs=kwargs, lora=lora, history=history, train_images=train_images,
                         train_seconds=train_seconds, config=asdict(cfg))
            save_training_state(out / f"checkpoint-epoch{epoch + 1}.pt", ctx, model=model, optimizer=optimizer, scheduler=scheduler,
                                epoch=epoch + 1, ema=ema, scaler=scaler, generator=generator, extra=extra)
    eval_model = ema.module if ema is not None else model
    ev = evaluate(eval_model, test_loader, device, cfg.amp, num_valid)
    correct, total = all_reduce_sum([ev["correct"], ev["images"]], ctx)
    eval_seconds = all_reduce_max(ev["seconds"], ctx)

    result: Dict[str, Any] = dict(
        task="classification", model=cfg.model, data=cfg.data, pretrained=cfg.pretrained, model_kwargs=kwargs,
        params=params, train_images=len(train_set), test_images=int(total), epochs=cfg.epochs,
        accuracy=correct / total, train_images_per_s=train_images / train_seconds, eval_images_per_s=total / eval_seconds,
        train_seconds=train_seconds, eval_seconds=eval_seconds, history=history,
        device=str(device), threads=torch.get_num_threads(), torch=torch.__version__, config=asdict(cfg), command=command,
    )
    if ctx.distributed:
        result.update(world_size=ctx.world_size, strategy=cfg.strategy, global_batch_size=cfg.batch_size * ctx.world_size)
    if ema is not None:
        result["evaluated_weights"] = f"EMA (decay {cfg.ema_decay})"
    if lora is not None:  # the adapters folded into the weights: the export has the entry's own layout
        from zoo.lora import merge_lora
        result["lora"] = lora
        eval_model = merge_lora(unwrap_model(eval_model))
    weights = full_model_state_dict(eval_model, ctx) if out is not None else None  # collective under FSDP
    result["wall_seconds"] = time.perf_counter() - wall_start
    if out is not None and ctx.is_main:
        result["run_id"] = uuid.uuid4().hex
        write_result_set(out, result, weights, {"model": cfg.model, "model_kwargs": kwargs})
    return result


def describe_run(cfg: FinetuneConfig, kwargs: Dict[str, Any], params: int, n_train: int, n_test: int,
                 ctx: Optional[DistContext] = None) -> str:
    """What is about to run, stated plainly: the entry, the exact create_model call, where weights come from."""
    from zoo import model_info

    call = ", ".join([repr(cfg.model)] + [f"{k}={v!r}" for k, v in kwargs.items()])
    weights = (f"pretrained weights of {cfg.model}" if cfg.pretrained
               else f"checkpoint {cfg.checkpoint_path}" if cfg.checkpoint_path
               else "none: random initialisation, trained from scratch (no --pretrained)")
    text = (f"finetune {cfg.model} on {cfg.data}: {n_train} train / {n_test} test images at {cfg.img_size}x{cfg.img_size}\n"
            f"  entry:   {model_info(cfg.model).get('description', cfg.model)}\n"
            f"  model:   create_model({call}) -> {params / 1e6:.2f}M params\n"
            f"  weights: {weights}\n"
            f"  train:   {cfg.epochs} epochs, batch {cfg.batch_size}, lr {cfg.lr:g}, device {cfg.device}, "
            f"{torch.get_num_threads()} threads")
    extras = []
    if ctx is not None and ctx.distributed:
        extras.append(f"{ctx.world_size} processes ({cfg.strategy}), batch {cfg.batch_size} per process = "
                      f"{cfg.batch_size * ctx.world_size} global")
    if cfg.amp:
        extras.append(f"autocast {'bf16' if cfg.amp is True else cfg.amp}")
    if cfg.layer_decay is not None:
        extras.append(f"layer-wise lr decay {cfg.layer_decay:g}")
    if cfg.ema_decay is not None:
        extras.append(f"EMA of weights (decay {cfg.ema_decay:g}), evaluated instead of the raw weights")
    if cfg.grad_checkpointing:
        extras.append("gradient checkpointing")
    if extras:
        text += "\n  options: " + "; ".join(extras)
    return text


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

    def limit(name: str):
        return number_arg(**LIMITS[name])
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
    p.add_argument("--epochs", type=limit("epochs"), default=d.epochs, help="passes over the training split")
    p.add_argument("--batch-size", type=limit("batch_size"), default=d.batch_size, help="images per step")
    p.add_argument("--lr", type=limit("lr"), default=d.lr, help="peak learning rate (AdamW)")
    p.add_argument("--min-lr", type=limit("min_lr"), default=d.min_lr, help="learning rate at the end of the cosine")
    p.add_argument("--warmup-epochs", type=limit("warmup_epochs"), default=d.warmup_epochs,
                   help="linear warmup length (may be fractional)")
    p.add_argument("--weight-decay", type=limit("weight_decay"), default=d.weight_decay,
                   help="AdamW weight decay on weights of 2+ dims")
    p.add_argument("--label-smoothing", type=limit("label_smoothing"), default=d.label_smoothing,
                   help="cross-entropy label smoothing")
    p.add_argument("--clip-grad", type=limit("clip_grad"), default=d.clip_grad, help="max gradient norm (0: no clipping)")
    p.add_argument("--img-size", type=limit("img_size"), default=d.img_size, help="image side after upsampling")
    p.add_argument("--patch-size", type=limit("patch_size"), default=d.patch_size,
                   help="patch size and stride (entries built for one patch size: Vim)")
    p.add_argument("--depth", type=limit("depth"), default=d.depth,
                   help="number of blocks (overrides the entry's; entries with one stack: Vim)")
    p.add_argument("--drop-path", type=limit("drop_path"), default=d.drop_path, help="stochastic depth rate")
    p.add_argument("--layer-shuffle", type=limit("layer_shuffle"), default=d.layer_shuffle,
                   help="stochastic layer-wise token shuffle in training (ShuffleMamba): the last block's probability, "
                        "rising linearly from 0 at the first; 0: off")
    p.add_argument("--model-kwargs", nargs="+", default=[], metavar="KEY=VALUE",
                   help="more keyword arguments for create_model, e.g. embed_dim=96 d_state=8")
    p.add_argument("--pretrained", action="store_true", help="start from the entry's pretrained weights (needs them cached or a network)")
    p.add_argument("--checkpoint-path", default=None, help="start from this checkpoint file")
    p.add_argument("--device", default=d.device, help="torch device, e.g. cpu or cuda")
    p.add_argument("--amp", nargs="?", const="bf16", default=None, choices=["bf16", "fp16"],
                   help="autocast: bf16 (also `--amp` alone) or fp16 (with a GradScaler on CUDA); default float32")
    p.add_argument("--seed", type=limit("seed"), default=d.seed, help="seeds the initialisation, the split and the batch order")
    p.add_argument("--threads", type=number_arg(int, 1), default=None, help="torch CPU threads (None: torch's choice)")
    p.add_argument("--limit-train-batches", type=limit("limit_train_batches"), default=None,
                   help="train on at most this many batches per epoch")
    p.add_argument("--output", default=None, help="write result.json and model.safetensors into this folder (checked "
                   "before training; an earlier run's files there are refused without --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run's result.json / model.safetensors / "
                   "checkpoints in --output")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = p.add_argument_group("scaling", "distributed training (launch with torchrun), memory and regularisation options")
    g.add_argument("--strategy", default=d.strategy, choices=STRATEGIES,
                   help="under torchrun: ddp (replicated weights) or fsdp (FSDP2 fully_shard: weights, gradients and "
                        "optimizer state sharded per block, for the large entries); --batch-size is per process")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations in backward (less memory)")
    g.add_argument("--layer-decay", type=limit("layer_decay"), default=d.layer_decay,
                   help="layer-wise lr decay through the model's group_matcher: the block below gets this times the lr "
                        "of the block above (timm's param_groups_layer_decay)")
    g.add_argument("--ema-decay", type=limit("ema_decay"), default=d.ema_decay,
                   help="keep an EMA of the weights with this decay (e.g. 0.999) and evaluate it instead")
    g.add_argument("--save-every", type=limit("save_every"), default=d.save_every,
                   help="write OUTPUT/checkpoint-epochN.pt (model, optimizer, scheduler, EMA, RNG) every N epochs and "
                        "after the last; 0: none")
    g.add_argument("--resume", default=None, metavar="PATH",
                   help="continue from a checkpoint-epochN.pt written by --save-every (same model arguments and --epochs)")
    g = p.add_argument_group("adapters", "parameter-efficient fine-tuning (needs peft: pip install 'mamba-zoo[peft]')")
    g.add_argument("--lora-rank", type=limit("lora_rank"), default=None,
                   help="train LoRA adapters of this rank on the mixer projections and the head, the rest frozen; "
                        "the exported model.safetensors has them merged (zoo.lora)")
    g.add_argument("--lora-alpha", type=limit("lora_alpha"), default=None, help="LoRA scale alpha / rank (default: alpha = 2 x rank)")
    p.add_argument("--json", action="store_true", help="print the result dict as JSON")
    p.set_defaults(func=_cli_finetune)


def _cli_finetune(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = FinetuneConfig(
        model=args.model, data=args.data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, min_lr=args.min_lr,
        warmup_epochs=args.warmup_epochs, weight_decay=args.weight_decay, label_smoothing=args.label_smoothing,
        clip_grad=args.clip_grad, img_size=args.img_size, patch_size=args.patch_size, depth=args.depth,
        drop_path=args.drop_path, layer_shuffle=args.layer_shuffle, model_kwargs=parse_model_kwargs(args.model_kwargs),
        pretrained=args.pretrained,
        checkpoint_path=args.checkpoint_path, device=args.device, amp=args.amp or False, seed=args.seed,
        limit_train_batches=args.limit_train_batches, output=args.output, progress=not args.no_progress,
        strategy=args.strategy, grad_checkpointing=args.grad_checkpointing, layer_decay=args.layer_decay,
        ema_decay=args.ema_decay, save_every=args.save_every, resume=args.resume, overwrite=args.overwrite,
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
    )
    result = finetune(cfg, command=args.command_line)
    if not is_main_process():
        return 0
    if args.json:
        print(json.dumps(result, indent=1))
    print(f"top-1 accuracy: {result['accuracy']:.4f} on {result['test_images']} {cfg.data} test images")
    print(f"images/s: train {result['train_images_per_s']:.1f}, eval {result['eval_images_per_s']:.1f}; "
          f"wall time {result['wall_seconds']:.1f} s (the job, without Python's start-up)")
    if cfg.output:
        print(f"wrote {Path(cfg.output) / 'result.json'} and {result['checkpoint']}")
    return 0
