"""Training machinery shared by the fine-tuning tasks: process groups, DDP / FSDP wrapping, mixed
precision, AdamW parameter groups (weight decay, layer-wise lr decay), the warmup + cosine schedule,
the optimizer step, EMA of weights, all-reduced metrics, and checkpoint / resume.

Distributed runs are launched with ``torchrun``, which sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``;
without them (or with ``WORLD_SIZE=1``) everything here is the plain single-process path and no process
group is created. Backends: NCCL for CUDA, gloo for CPU.

Checkpoints (:func:`save_training_state`) are written with ``torch.save`` holding only tensors and plain
Python types, and read back with ``torch.load(weights_only=True)``. Model and optimizer states are the
*full* (unsharded) state dicts from ``torch.distributed.checkpoint.state_dict``, keyed by parameter name,
so a checkpoint written by a DDP, FSDP or single-process run resumes under any of them.
"""
from __future__ import annotations

import argparse
import math
import os
import pickle
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn

from zoo.core.checks import check_float, check_int, describe_range, range_error
from zoo.hub import atomic_write, write_text_atomic  # noqa: F401  (the tasks write files through these)

STRATEGIES = ("ddp", "fsdp")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CHECKPOINT_FORMAT = "zoo-training-state"
CHECKPOINT_VERSION = 1


# ----------------------------------------------------------------------------------- arguments, devices, files

def number_arg(kind: type = int, low: Optional[float] = None, high: Optional[float] = None, low_open: bool = False,
               high_open: bool = False, optional: bool = False) -> Callable[[str], Any]:
    """An argparse ``type=``: the text as ``kind`` in the range, else argparse's usage error naming the option,
    e.g. ``argument --batch-size: must be an integer >= 1, got 0``. ``optional`` is ignored (an option given on
    the command line always has a value)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = text
        problem = range_error(kind, value, low, high, low_open, high_open)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = describe_range(kind, low, high, low_open, high_open)
    return parse


def check_fields(owner: str, obj: Any, limits: Mapping[str, Mapping[str, Any]]) -> None:
    """Check the numeric fields of a config against ``limits`` ({field: number_arg keywords}); the message
    names ``owner``, the field and the value."""
    for name, spec in limits.items():
        spec = dict(spec)
        kind = spec.pop("kind", int)
        value = getattr(obj, name)
        if kind is int:
            check_int(f"{owner}: {name}", value, spec.get("low"), spec.get("high"), optional=spec.get("optional", False))
        else:
            check_float(f"{owner}: {name}", value, **spec)


def resolve_device(device: Union[str, torch.device]) -> torch.device:
    """``device`` as a torch.device that this machine has, else a ValueError saying what is available."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be a torch device such as 'cpu', 'cuda' or 'cuda:1', got {device!r}") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested, but torch.cuda.is_available() is False "
                             f"(no CUDA GPU or driver, or a CPU-only torch {torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} requested, but only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} requested, but torch.backends.mps.is_available() is False; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device must be cpu, cuda or mps, got {device!r}")
    return dev


def prepare_output_dir(path: Union[str, Path], overwrite: bool = False, run_files: Iterable[str] = (),
                       option: str = "--output") -> Path:
    """Check an output folder before the first training step: it is (or can be made) a writable folder, and
    holds none of ``run_files`` (glob patterns: an earlier run's results) unless ``overwrite``. Creates it."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{option} {out}: expected a folder, got an existing file")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ValueError(f"{option} {out}: expected a folder this process can write to, got {type(e).__name__}: "
                         f"{e.strerror or e}") from e
    found = sorted({p.name for pattern in run_files for p in out.glob(pattern)})
    if found and not overwrite:
        raise ValueError(f"{option} {out} already holds {', '.join(found)} of an earlier run; pass --overwrite to "
                         f"replace them, or choose another folder")
    return out


def check_output_file(path: Union[str, Path], option: str = "--output") -> Path:
    """Check, before any work, that a result file can be written at ``path``: not a folder, its parent a
    folder this process can write to (created if missing)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path}: expected a file name, got an existing folder")
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise ValueError(f"{option} {path}: its parent {parent} is a file, expected a folder")
    prepare_output_dir(parent, option=option)
    return path


# --------------------------------------------------------------------------------------------- processes

@dataclass
class DistContext:
    """Where this process stands: its rank among ``world_size`` processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # this context created the process group (and destroys it)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_main_process() -> bool:
    """Rank 0 (or no launcher): the process that prints, shows progress bars and writes files."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def init_distributed(device: Union[str, torch.device] = "cpu") -> DistContext:
    """Join the process group that ``torchrun`` describes in the environment, or return the single-process
    context. Under torchrun a CUDA device becomes ``cuda:LOCAL_RANK`` (one GPU per process, NCCL); a CPU
    device uses gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device) if world <= 1 else torch.device(device)
    if world <= 1:
        return DistContext(device=dev)
    if "RANK" not in os.environ or "LOCAL_RANK" not in os.environ:
        raise ValueError(f"WORLD_SIZE={world} but RANK / LOCAL_RANK are not set: launch with torchrun")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested under torchrun, but torch.cuda.is_available() is False")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank} needs GPU {local_rank}, but only {torch.cuda.device_count()} are visible")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    elif dev.type == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"distributed training supports cuda (NCCL) and cpu (gloo) devices, got {device!r}")
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend, **({"device_id": dev} if backend == "nccl" else {}))
        owns = True
    if dist.get_world_size() != world or dist.get_rank() != rank:
        raise ValueError(f"process group has rank {dist.get_rank()} of {dist.get_world_size()}, "
                         f"the environment says rank {rank} of {world}")
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev, owns_group=owns)


def cleanup_distributed(ctx: DistContext) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: Sequence[float], ctx: DistContext) -> List[float]:
    """Element-wise sum of ``values`` over all processes (identity in a single process)."""
    if not ctx.distributed:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_max(value: float, ctx: DistContext) -> float:
    if not ctx.distributed:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


class ShardSampler(torch.utils.data.Sampler):
    """Evaluation sampler: rank r gets indices r, r + world, ...; the shards are padded (wrapping around)
    to the same length so every process runs the same number of forward passes (FSDP needs that).
    ``num_valid`` is how many leading samples of this rank's stream are real; the padding is not counted."""

    def __init__(self, n: int, rank: int, world_size: int):
        self.n, self.rank, self.world_size = n, rank, world_size
        self.per_rank = math.ceil(n / world_size)
        self.num_valid = len(range(rank, n, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter([p % self.n for p in range(self.rank, self.per_rank * self.world_size, self.world_size)])

    def __len__(self) -> int:
        return self.per_rank


# ----------------------------------------------------------------------------------------------- models

def fsdp_units(model: nn.Module) -> List[nn.Module]:
    """The submodules FSDP shards separately: every element of every ``nn.ModuleList`` that holds
    parameters (Vim's layers, VMamba's stages and their blocks, ...), deepest first."""
    units = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            for i, child in enumerate(module):
                if any(True for _ in child.parameters()):
                    units.append((f"{name}.{i}".count("."), child))
    return [m for _, m in sorted(units, key=lambda t: -t[0])]


def _fully_shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard  # FSDP2

    for unit in fsdp_units(model):
        fully_shard(unit)
    fully_shard(model)
    return model


def wrap_model(model: nn.Module, ctx: DistContext, strategy: str = "ddp") -> nn.Module:
    """DDP (parameters replicated, gradients all-reduced) or FSDP2 ``fully_shard`` (parameters, gradients
    and optimizer state sharded per ModuleList element); the model itself in a single process."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not ctx.distributed:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    return _fully_shard(model)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under a DDP wrapper (an FSDP2 module is its own module)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


# ------------------------------------------------------------------------------------ optimizer, schedule

def param_groups_weight_decay(model: nn.Module, weight_decay: float):
    """Two AdamW groups: decayed weights, and undecayed 1-D params (norms, biases, D) plus the
    names in ``model.no_weight_decay()`` (position embedding, class token)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def param_groups_layer_decay(model: nn.Module, weight_decay: float, layer_decay: float):
    """timm's layer-wise lr decay groups (BEiT style) from the model's ``group_matcher``: parameters the
    matcher leaves out (the head) keep lr scale 1, the last block (with the final norm, for matchers that
    put it there) ``layer_decay``, each block below ``layer_decay`` times the one above, the stem
    ``layer_decay ** (num_blocks + 1)``. Weight decay as :func:`param_groups_weight_decay`. Each group
    carries its ``lr_scale``."""
    from timm.optim import param_groups_layer_decay as timm_layer_decay

    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer decay must be in (0, 1], got {layer_decay}")
    if not hasattr(model, "group_matcher"):
        raise ValueError(f"layer-wise lr decay needs model.group_matcher(); {type(model).__name__} has none")
    skip = tuple(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else ()
    return timm_layer_decay(model, weight_decay=weight_decay, no_weight_decay_list=skip, layer_decay=layer_decay)


def create_optimizer(model: nn.Module, lr: float, weight_decay: float, layer_decay: Optional[float] = None):
    """AdamW over :func:`param_groups_weight_decay`, or over :func:`param_groups_layer_decay` with each
    group's lr set to ``lr * lr_scale`` when ``layer_decay`` is given. Build it after :func:`wrap_model`
    (FSDP replaces the parameters) from :func:`unwrap_model`'s module."""
    if layer_decay is None:
        return torch.optim.AdamW(param_groups_weight_decay(model, weight_decay), lr=lr)
    groups = param_groups_layer_decay(model, weight_decay, layer_decay)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    return torch.optim.AdamW(groups, lr=lr)


def cosine_with_warmup(optimizer, total_steps: int, warmup_steps: int, min_lr: float, base_lr: Optional[float] = None):
    """Per-step schedule: linear from ~0 to the base lr over warmup_steps, then cosine to min_lr. Every
    group follows the same factor, so a group at ``lr_scale * base_lr`` ends at ``lr_scale * min_lr``.
    ``base_lr`` defaults to the first group's lr."""
    base = optimizer.param_groups[0]["lr"] if base_lr is None else base_lr

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return (min_lr + (base - min_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))) / base

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------------------------------- precision

def amp_dtype(amp: Union[None, bool, str]) -> Optional[torch.dtype]:
    """``None`` / ``False``: float32; ``True`` or ``"bf16"``: bfloat16; ``"fp16"``: float16."""
    if amp is None or amp is False or amp == "none":
        return None
    if amp is True:
        return torch.bfloat16
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {sorted(AMP_DTYPES)} (or none), got {amp!r}")
    return AMP_DTYPES[amp]


def autocast(device: torch.device, amp: Union[None, bool, str]):
    """``torch.autocast`` for ``amp`` (disabled, a no-op, when ``amp`` is off)."""
    dtype = amp_dtype(amp)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def create_grad_scaler(amp: Union[None, bool, str], device: torch.device, strategy: str = "ddp", distributed: bool = False):
    """A loss scaler for float16 on CUDA (ShardedGradScaler under FSDP, whose inf checks are all-reduced);
    ``None`` otherwise (bfloat16 and float32 need none; CPU float16 runs unscaled)."""
    if amp_dtype(amp) is not torch.float16 or device.type != "cuda":
        return None
    if distributed and strategy == "fsdp":
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler()
    return torch.amp.GradScaler("cuda")


def backward_and_step(loss: torch.Tensor, model: nn.Module, optimizer, clip_grad: Optional[float] = None, scaler=None) -> None:
    """Zero the gradients, backward, clip the gradient norm (after unscaling), optimizer step."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        if clip_grad:
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        optimizer.step()
        return
    scaler.scale(loss).backward()
    if clip_grad:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    scaler.step(optimizer)
    scaler.update()


# ---------------------------------------------------------------------------------------------------- EMA

def create_ema(model: nn.Module, decay: float, ctx: DistContext, strategy: str = "ddp"):
    """timm's ModelEmaV3 over ``model`` with a constant ``decay``: after each step
    ``ema = decay * ema + (1 - decay) * weights``. Call it on the plain model, before :func:`wrap_model`;
    under FSDP the EMA copy is sharded like the model. Update it with ``ema.update(unwrap_model(model))``."""
    from timm.utils import ModelEmaV3

    if not 0.0 <= decay < 1.0:
        raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
    ema = ModelEmaV3(model, decay=decay)
    if ctx.distributed and strategy == "fsdp":
        _fully_shard(ema.module)
    return ema


# ----------------------------------------------------------------------------------------------- RNG state

def rng_state(generator: Optional[torch.Generator] = None, device: Optional[torch.device] = None) -> Dict[str, Any]:
    """This process's random states (torch CPU, the CUDA device's, a data loader generator) as tensors."""
    state: Dict[str, Any] = {"torch": torch.get_rng_state(), "cuda": None, "generator": None}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: Dict[str, Any], generator: Optional[torch.Generator] = None, device: Optional[torch.device] = None) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    if generator is not None and state.get("generator") is not None:
        generator.set_state(state["generator"])


# ----------------------------------------------------------------------------------------------- checkpoints

def _sd_options(ctx: DistContext):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Full (unsharded) tensors; in a process group they are gathered to rank 0 on the CPU (others get {}).
    return StateDictOptions(full_state_dict=True, cpu_offload=ctx.distributed)


def full_model_state_dict(model: nn.Module, ctx: DistContext) -> Dict[str, torch.Tensor]:
    """The unsharded state dict (no DDP ``module.`` prefix) on the CPU; complete on rank 0, may be empty
    on the other ranks. Collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return {k: v.detach().cpu() for k, v in get_model_state_dict(model, options=_sd_options(ctx)).items()}


def save_training_state(path: Union[str, Path], ctx: DistContext, *, model: nn.Module, optimizer, scheduler, epoch: int,
                        ema=None, scaler=None, generator: Optional[torch.Generator] = None,
                        extra: Optional[Dict[str, Any]] = None) -> None:
    """Write everything a resume needs: model, optimizer, scheduler, EMA, loss scaler, the number of
    finished epochs, every rank's RNG states, and ``extra`` (plain types). Collective: every rank calls
    it; rank 0 writes ``path`` (atomically, through a temporary file)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    opts = _sd_options(ctx)
    model_sd = get_model_state_dict(model, options=opts)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=opts)
    ema_sd = get_model_state_dict(ema.module, options=opts) if ema is not None else None
    rng = rng_state(generator, ctx.device)
    if ctx.distributed:
        gathered: List[Any] = [None] * ctx.world_size
        dist.all_gather_object(gathered, rng)
        rngs = gathered
    else:
        rngs = [rng]
    if ctx.is_main:
        state = dict(
            format=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION, epoch=epoch, world_size=ctx.world_size,
            model=model_sd, optimizer=optim_sd, scheduler=scheduler.state_dict(), ema=ema_sd,
            scaler=scaler.state_dict() if scaler is not None else None, rng=[_to_cpu(r) for r in rngs], extra=extra or {},
        )
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
    if ctx.distributed:
        dist.barrier()


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    return obj


def read_training_state(path: Union[str, Path]) -> Dict[str, Any]:
    """Load a file written by :func:`save_training_state` (``weights_only=True``: tensors and plain types only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"resume: no checkpoint file at {path}")
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":  # safetensors: 8-byte header length, then a JSON header
        raise ValueError(f"resume: {path} is a safetensors weights file, not a training checkpoint "
                         f"(expected checkpoint-epochN.pt from --save-every; weights alone load with --checkpoint-path)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # a pickle holding objects beyond tensors and plain types
        raise ValueError(f"resume: {path} is refused: {_unpickling_reason(str(e))}; only a full unpickle could rebuild "
                         f"that, and unpickling a file can run arbitrary code, so zoo reads checkpoints with "
                         f"torch.load(weights_only=True) (tensors and plain types only). Expected a checkpoint-epochN.pt "
                         f"written by --save-every") from e
    except Exception as e:  # not a torch file at all
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"resume: {path} is not a training checkpoint (expected a checkpoint-epochN.pt written by "
                         f"--save-every): torch.load failed with {type(e).__name__}: {first}") from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"resume: {path} is not a training checkpoint: expected format {CHECKPOINT_FORMAT!r}, got {got!r} "
                         f"(model weights alone load with --checkpoint-path)")
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"resume: {path} has checkpoint version {state.get('version')!r}, expected {CHECKPOINT_VERSION}")
    return state


def _unpickling_reason(message: str) -> str:
    """What torch's weights_only unpickler refused, without its advice to load with weights_only=False."""
    found = re.search(r"GLOBAL ([\w.]+)", message)
    if found:
        return f"it holds an object of type {found.group(1)}, which is not a tensor or a plain Python type"
    found = re.search(r"WeightsUnpickler error: ([^\n]*?)(?:\. Please|\n|$)", message)
    return f"it holds something the weights-only unpickler does not read ({found.group(1).strip()})" if found \
        else "it holds objects beyond tensors and plain Python types"


def load_training_state(state: Dict[str, Any], ctx: DistContext, *, model: nn.Module, optimizer, scheduler, ema=None,
                        scaler=None, generator: Optional[torch.Generator] = None) -> int:
    """Restore what :func:`save_training_state` wrote into the (already wrapped) model, optimizer,
    scheduler, EMA and scaler, and this rank's RNG states; returns the number of finished epochs. Every
    rank reads the full file. RNG states are restored only for the same number of processes (a warning
    is returned in ``state['rng_note']`` otherwise)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True)
    try:
        set_model_state_dict(model, state["model"], options=opts)
    except RuntimeError as e:
        raise ValueError(f"resume: the checkpoint's model weights do not fit the model built from the arguments: {e}") from e
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=opts)
    scheduler.load_state_dict(state["scheduler"])
    if ema is not None:
        if state.get("ema") is None:
            raise ValueError("resume: EMA is enabled but the checkpoint holds no EMA weights (it was written without --ema)")
        set_model_state_dict(ema.module, state["ema"], options=opts)
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    rngs = state.get("rng") or []
    if len(rngs) == ctx.world_size:
        set_rng_state(rngs[ctx.rank], generator, ctx.device)
        state["rng_note"] = None
    else:
        state["rng_note"] = (f"checkpoint written by {len(rngs)} processes, resumed with {ctx.world_size}: "
                             "random states (augmentation, data order) are not restored")
    return int(state["epoch"])
