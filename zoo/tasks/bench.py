"""``zoo bench``: every registered entry on its modality's downstream task, in one results table.

Per entry the bench runs the task that zoo.tasks defines for its modality, through that task's own train and
evaluation functions, so the metric is the task's metric:

=====================  ===============================================  ==========================================
modality (entries)     task (zoo.tasks module)                          metric
=====================  ===============================================  ==========================================
vision classifiers     digits classification (classification.finetune)  top-1 accuracy on the 360 test digits
PointMamba / PCM       Shapes3D classification (point_classification)   overall accuracy
S-Mamba, Chimera       epf_fr_be, look-back 96 -> 96 (forecasting)      test MSE (standardised; MAE also kept)
their classifiers      UEA BasicMotions (ts_classification)             test accuracy
speech encoders        keyword spotting / CTC digits (speech)           accuracy / character error rate
MIL aggregators        digit bags (mil)                                 test accuracy (AUC also kept)
=====================  ===============================================  ==========================================

Training every entry in full on a CPU takes far too long, so each run has a stated budget (``--budget``):
``full`` is each task's default recipe (its epochs and data) on the entry's registered architecture, except
where the task's default changes the architecture (``zoo finetune``'s 6 blocks and 8x8 patches for Vim at
32x32, ``zoo mil bench``'s width 64 for MIL); ``quick`` trains the entry at its registered width with fewer
layers for at most a few dozen steps on small data (metrics near chance level are expected; the row is for
params, FLOPs, speed and memory at the task's input, and proves the entry runs the task); ``tiny`` is a smoke
budget for tests. Whatever was changed (architecture keyword arguments, epochs, steps, data sizes) is written into the
row. Entries with pretrained weights of our own (a pretrained cfg whose ``file`` is package data, listed by
``zoo.list_models(pretrained=True)``) get a second row: those weights evaluated directly, no training.
Weights published elsewhere (the official ImageNet checkpoints, fetched from the Hugging Face Hub) are not
downloaded; those entries train from random initialisation at the budget. Entries whose task zoo.tasks does
not define (masked point modelling, part segmentation, survival) get a row saying so. A failing entry's row
records the error and the bench goes on.

Besides the metric every row has: parameters of the model that ran (and of the registered entry), forward
FLOPs for one sample at the task's input counted by ``torch.utils.flop_counter.FlopCounterMode`` (on the
CPU path; matmul, convolution, bmm and attention kernels are counted, elementwise work is not), inference
throughput (samples/s, median of timed forward passes of one evaluation batch) and the peak memory of that
forward pass: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the peak increase of the process's
resident set size (Linux ``VmHWM`` after a ``malloc_trim`` and a reset through ``/proc/self/clear_refs``),
which counts everything the process touched, PyTorch's allocations and the allocator's slack.
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import math
import platform
import statistics
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from zoo.tasks.engine import number_arg, prepare_output_dir, resolve_device, write_text_atomic

BUDGETS = ("tiny", "quick", "full")

# --- which task an entry belongs to ------------------------------------------------------------------------

NO_TASK = {
    "pointmamba_mpm": "masked point modelling (pre-training) has no downstream task in zoo.tasks",
    "pointmamba_partseg": "part segmentation has no task in zoo.tasks (needs ShapeNetPart)",
    "mambamil_survival": "survival prediction has no task in zoo.tasks",
}


def task_of(name: str) -> str:
    """The zoo.tasks task an entry (arch name, no tag) is benchmarked on, or "none"."""
    from zoo import model_info

    if name in NO_TASK:
        return "none"
    module = model_info(name)["module"]
    modality = module.split(".")[2] if module.startswith("zoo.models.") else ""
    if modality == "vision":
        return "classification"
    if modality == "point":
        return "point_classification"
    if modality == "timeseries":
        return "ts_classification" if name in ("smamba_classifier", "chimera_classifier") else "forecasting"
    if modality == "speech":
        return "kws" if "kws" in name else "ctc_digits"
    if modality == "mil":
        return "mil"
    return "none"


# --- measurements ------------------------------------------------------------------------------------------

def _proc_status_kib(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_rss_peak() -> bool:
    """Return freed heap to the OS and reset the peak RSS (VmHWM); False where the platform cannot."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_forward(model: nn.Module, forward: Callable[[nn.Module], Any], batch: int, device: torch.device,
                    reps: int = 5, warmup: int = 2, min_seconds: float = 1.0, max_reps: int = 50) -> Dict[str, Any]:
    """Inference samples/s (median of at least ``reps`` timed passes, more until ``min_seconds`` have passed,
    at most ``max_reps``) and the peak memory of those forward passes."""
    model.eval()
    with torch.inference_mode():
        for _ in range(warmup):
            forward(model)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        else:
            can_reset = _reset_rss_peak()
            base = _proc_status_kib("VmRSS")
        times: List[float] = []
        while len(times) < reps or (sum(times) < min_seconds and len(times) < max_reps):
            start = time.perf_counter()
            forward(model)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
    out: Dict[str, Any] = {"batch": batch, "reps": len(times), "seconds_per_batch": statistics.median(times)}
    out["samples_per_s"] = batch / out["seconds_per_batch"]
    if device.type == "cuda":
        out["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
        out["peak_memory_method"] = "torch.cuda.max_memory_allocated over the timed forward passes (model weights included)"
    elif can_reset and base is not None:
        out["peak_memory_bytes"] = max(0, (_proc_status_kib("VmHWM") - base)) * 1024
        out["peak_memory_method"] = ("CPU: peak RSS increase over the timed forward passes (VmHWM reset through "
                                     "/proc/self/clear_refs after malloc_trim; weights already resident, not counted)")
    else:
        out["peak_memory_bytes"] = None
        out["peak_memory_method"] = "not measured: /proc/self/clear_refs is not available on this platform"
    return out


def count_flops(model: nn.Module, forward: Callable[[nn.Module], Any]) -> Optional[int]:
    """Forward FLOPs of ``forward(model)`` counted by FlopCounterMode on a CPU copy of the model."""
    from torch.utils.flop_counter import FlopCounterMode

    cpu_model = copy.deepcopy(model).cpu().eval().requires_grad_(False)  # no autograd hooks from the module tracker
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        forward(cpu_model)
    return int(counter.get_total_flops())


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _to(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device) for v in x)
    return x


# --- the tasks ---------------------------------------------------------------------------------------------
# Each runner returns: model (trained or loaded), metric dict, train settings, and an example input
# (args for the forward call, on CPU) of one evaluation batch and of one sample.

def _vision_overrides(name: str, budget: str) -> Dict[str, Any]:
    if budget == "full":
        return {}
    if name.startswith("vim"):
        return {"depth": 1 if budget == "tiny" else 2} | ({"embed_dim": 32} if budget == "tiny" else {})
    if name.startswith(("vmamba", "efficient_vmamba")):
        return {"depths": (1, 1, 1, 1)} | ({"dims": 16} if budget == "tiny" else {})
    return {}


def run_classification(name: str, budget: str, device: torch.device, seed: int, pretrained_tag: Optional[str]):
    import zoo
    from timm.data import resolve_data_config
    from torch.utils.data import DataLoader

    from zoo.data import create_dataset
    from zoo.tasks.classification import FinetuneConfig, evaluate, finetune

    if pretrained_tag is not None:  # our own weights: evaluate as they are
        model = zoo.create_model(f"{name}.{pretrained_tag}", pretrained=True).to(device)
        size = int((model.pretrained_cfg.get("input_size") or (3, 32, 32))[-1])
        data_cfg = resolve_data_config({}, model=model)
        test = create_dataset("digits", "test", img_size=size, mean=data_cfg["mean"], std=data_cfg["std"], seed=seed)
        ev = evaluate(model, DataLoader(test, batch_size=128), device)
        metrics = {"top1_accuracy": ev["accuracy"], "test_images": ev["images"]}
        train = {"trained": False, "evaluated": "digits test split", "img_size": size}
        model_kwargs: Dict[str, Any] = {}
    else:
        overrides = _vision_overrides(name, budget)
        kw = dict(model=name, data="digits", seed=seed, device=str(device), progress=False)
        if budget == "full":
            cfg = FinetuneConfig(**kw)
        else:
            steps = 2 if budget == "tiny" else 20
            cfg = FinetuneConfig(
                **kw, epochs=1, batch_size=16 if budget == "tiny" else 32, limit_train_batches=steps,
                img_size=16 if budget == "tiny" else 32, patch_size=4 if budget == "tiny" else 8,
                depth=overrides.pop("depth", None), model_kwargs=overrides,
            )
        with tempfile.TemporaryDirectory() as tmp:
            cfg.output = tmp
            result = finetune(cfg)
            model_kwargs = result["model_kwargs"]
            model = zoo.create_model(name, checkpoint_path=str(Path(tmp) / "model.safetensors"), **model_kwargs).to(device)
        recipe = "zoo.tasks.classification.finetune"
        metrics = {"top1_accuracy": result["accuracy"], "test_images": result["test_images"],
                   "train_images_per_s": result["train_images_per_s"]}
        train = {"trained": True, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
                 "limit_train_batches": cfg.limit_train_batches, "img_size": cfg.img_size, "lr": cfg.lr,
                 "recipe": recipe}
        size = cfg.img_size
        data_cfg = resolve_data_config({}, model=model)
        test = create_dataset("digits", "test", img_size=size, mean=data_cfg["mean"], std=data_cfg["std"], seed=seed)
    images = torch.stack([test[i][0] for i in range(32)])
    return dict(model=model, metric=("top1_accuracy", True), metrics=metrics, train=train, model_kwargs=model_kwargs,
                data=f"scikit-learn digits at {size}x{size}", batch=(images,), sample=(images[:1],),
                input_desc=f"image (3, {size}, {size})", unit="images/s")


def run_point_classification(name: str, budget: str, device: torch.device, seed: int, pretrained_tag: Optional[str]):
    import zoo
    from zoo.data.shapes3d import CLASSES, make_shapes3d
    from zoo.tasks.point_classification import evaluate, train_model

    sizes = {"tiny": (4, 4, 128, 1), "quick": (16, 20, 256, 1), "full": (120, 60, 512, 8)}[budget]
    train_pc, test_pc, num_points, epochs = sizes
    batch_size = 16 if budget != "full" else 32
    if pretrained_tag is not None:  # our own weights: the full task's test split, at the cfg's cloud size
        model = zoo.create_model(f"{name}.{pretrained_tag}", pretrained=True)
        num_points = int((model.pretrained_cfg.get("input_size") or (512, 3))[0])
        test_x, test_y = make_shapes3d(60, num_points, seed=2000)
        model_kwargs: Dict[str, Any] = {}
        train: Dict[str, Any] = {"trained": False, "evaluated": "Shapes3D test split (60 per class, seed 2000)"}
    else:
        overrides: Dict[str, Any] = {}
        if name.startswith("pointmamba"):  # patches scale with the cloud, as in zoo points bench
            overrides = {"num_group": num_points // 16} | ({} if budget == "full" else {"depth": 2, "group_size": 16})
        elif name.startswith("pcm") and budget != "full":
            from zoo.models.point.pcm import PCM_ORDERS

            overrides = {"mamba_blocks": (1, 1, 1, 1), "orders": tuple(PCM_ORDERS[:4])}  # one order per layer
        train_x, train_y = make_shapes3d(train_pc, num_points, seed=1000)
        test_x, test_y = make_shapes3d(test_pc, num_points, seed=2000)
        torch.manual_seed(seed)
        model_kwargs = dict(num_classes=len(CLASSES), **overrides)
        model = zoo.create_model(name, **model_kwargs)
        secs = train_model(model, train_x, train_y, epochs, batch_size, 1e-3, seed, device)
        train = {"trained": True, "epochs": epochs, "train_clouds": len(train_x), "num_points": num_points,
                 "batch_size": batch_size, "lr": 1e-3, "seconds": secs, "recipe": "zoo.tasks.point_classification.train_model"}
    model.to(device)
    ev = evaluate(model, test_x, test_y, 64, device)
    metrics = {"overall_accuracy": ev["overall_accuracy"], "mean_class_accuracy": ev["mean_class_accuracy"],
               "test_clouds": len(test_x)}
    return dict(model=model, metric=("overall_accuracy", True), metrics=metrics, train=train, model_kwargs=model_kwargs,
                data=f"Shapes3D ({len(CLASSES)} classes, {num_points} points)", batch=(test_x[:16],),
                sample=(test_x[:1],), input_desc=f"points ({num_points}, 3)", unit="clouds/s")


def run_forecasting(name: str, budget: str, device: torch.device, seed: int, pretrained_tag: Optional[str]):
    import zoo
    from zoo.data.timeseries import load_forecast_data
    from zoo.tasks.forecasting import _predict, evaluate_forecaster, train_forecaster

    if pretrained_tag is not None:  # our own weights: the test windows at the model's look-back and horizon
        model = zoo.create_model(f"{name}.{pretrained_tag}", pretrained=True)
        data = load_forecast_data("epf_fr_be", model.seq_len, model.pred_len)
        model_kwargs: Dict[str, Any] = {}
        train: Dict[str, Any] = {"trained": False, "evaluated": "epf_fr_be test windows"}
    else:
        pred_len = 24 if budget == "tiny" else 96
        data = load_forecast_data("epf_fr_be", 96, pred_len)
        settings = {"tiny": dict(epochs=1, steps_per_epoch=2), "quick": dict(epochs=1, steps_per_epoch=20),
                    "full": dict(epochs=10, steps_per_epoch=None)}[budget]
        model_kwargs = dict(seq_len=96, pred_len=pred_len, enc_in=len(data.columns))
        if budget != "full":
            model_kwargs["e_layers"] = 1
        torch.manual_seed(seed)
        model = zoo.create_model(name, **model_kwargs)
        hist = train_forecaster(model, data, settings["epochs"], 1e-3, 32, 3, settings["steps_per_epoch"], seed, device,
                                progress=False)
        train = {"trained": True, **settings, "batch_size": 32, "lr": 1e-3, "patience": 3, "epochs_run": hist["epochs_run"],
                 "recipe": "zoo.tasks.forecasting.train_forecaster (best validation weights restored)"}
    model.to(device)
    test = evaluate_forecaster(model, data.test, device=device)
    metrics = {"test_mse": test["mse"], "test_mae": test["mae"], "test_windows": len(data.test)}
    xs, ys, marks = zip(*[data.test[i] for i in range(16)])
    x, m = torch.stack(xs), torch.stack(marks)
    return dict(model=model, metric=("test_mse", False), metrics=metrics, train=train, model_kwargs=model_kwargs,
                data=f"epf_fr_be ({len(data.columns)} variates), look-back {data.seq_len} -> {data.pred_len}",
                batch=(x, m), sample=(x[:1], m[:1]), forward=lambda mod, x, m: _predict(mod, x, m),
                input_desc=f"window ({data.seq_len}, {len(data.columns)}) + time marks", unit="windows/s")


def run_ts_classification(name: str, budget: str, device: torch.device, seed: int, pretrained_tag: Optional[str]):
    import zoo
    from zoo.data.timeseries import load_classification_set
    from zoo.tasks.ts_classification import _accuracy, train_classifier

    X_train, y_train, classes = load_classification_set("BasicMotions", "train")
    X_test, y_test, _ = load_classification_set("BasicMotions", "test")
    if pretrained_tag is not None:  # our own weights: the official test split
        model = zoo.create_model(f"{name}.{pretrained_tag}", pretrained=True)
        model_kwargs: Dict[str, Any] = {}
        train: Dict[str, Any] = {"trained": False, "evaluated": "BasicMotions official test split"}
    else:
        epochs = {"tiny": 1, "quick": 10, "full": 100}[budget]
        model_kwargs = dict(seq_len=X_train.shape[1], num_classes=len(classes), enc_in=X_train.shape[2])
        torch.manual_seed(seed)
        model = zoo.create_model(name, **model_kwargs)
        secs = train_classifier(model, X_train, y_train, epochs, 1e-3, 16, seed=seed, progress=False)
        train = {"trained": True, "epochs": epochs, "batch_size": 16, "lr": 1e-3, "seconds": secs,
                 "recipe": "zoo.tasks.ts_classification.train_classifier (CPU)"}
    acc = _accuracy(model.cpu(), X_test, y_test)
    model.to(device)
    metrics = {"test_accuracy": acc, "test_series": len(X_test)}
    x = torch.as_tensor(X_test[:16])
    return dict(model=model, metric=("test_accuracy", True), metrics=metrics, train=train, model_kwargs=model_kwargs,
                data=f"UEA BasicMotions {tuple(X_train.shape[1:])}", batch=(x,), sample=(x[:1],),
                input_desc=f"series {tuple(X_train.shape[1:])}", unit="series/s")


def _run_speech(kind: str, name: str, budget: str, device: torch.device, seed: int, pretrained_tag: Optional[str]):
    import zoo
    from torch.utils.data import DataLoader

    from zoo.data.speech import SynthSpeech, build_corpus, collate_waves
    from zoo.tasks.speech import evaluate, run_speech_task

    metric = ("accuracy", True) if kind == "kws" else ("cer", False)
    corpus = build_corpus(kind, seed=seed, progress=False)  # the task's default corpus (cached after the first build)
    test = SynthSpeech(corpus, "test", train=False, seed=seed)
    model_kwargs: Dict[str, Any] = {}
    if pretrained_tag is not None:  # our own weights: the held-out voices
        model = zoo.create_model(f"{name}.{pretrained_tag}", pretrained=True)
        value = evaluate(kind, model, DataLoader(test, 32, shuffle=False, collate_fn=collate_waves))[metric[0]]
        train: Dict[str, Any] = {"trained": False, "evaluated": "held-out voices"}
    else:
        if kind == "digits":
            model_kwargs["num_classes"] = 11  # blank + 10 digits
        if budget != "full" and name == "conmamba_ctc_large":
            model_kwargs["depth"] = 2
        settings = {"tiny": dict(epochs=1, limit_batches=2), "quick": dict(epochs=1, limit_batches=20),
                    "full": dict(epochs=8, limit_batches=None)}[budget]
        with tempfile.TemporaryDirectory() as tmp:
            weights = str(Path(tmp) / "model.safetensors")
            result = run_speech_task(kind, name, settings["epochs"], 32, 2e-3, seed, progress=False, save_weights=weights,
                                     limit_batches=settings["limit_batches"], **model_kwargs)
            model = zoo.create_model(name, checkpoint_path=weights, **model_kwargs)
        value = result[metric[0]]
        train = {"trained": True, **settings, "batch_size": 32, "lr": 2e-3, "seconds": result["train_seconds"],
                 "recipe": "zoo.tasks.speech.run_speech_task"}
    model.to(device)
    metrics = {metric[0]: value, "test_utterances": len(test)}
    waves, lengths, _ = collate_waves([test[i] for i in range(min(16, len(test)))])
    return dict(model=model, metric=metric, metrics=metrics, train=train, model_kwargs=model_kwargs,
                data=f"synthesized speech ({'keywords' if kind == 'kws' else 'digit strings'}, held-out voices)",
                batch=(waves, lengths), sample=(waves[:1], lengths[:1]),
                input_desc=f"waveform, 16 kHz, padded to {waves.shape[-1]} samples", unit="utterances/s")


def run_mil(name: str, budget: str, device: torch.device, seed: int, pretrained_tag: Optional[str]):
    import zoo
    from zoo.data.digit_bags import make_digit_bags
    from zoo.tasks.mil import evaluate_mil, train_mil

    train_bags, test_bags, epochs = {"tiny": (16, 32, 1), "quick": (64, 100, 2), "full": (300, 300, 10)}[budget]
    if pretrained_tag is not None:  # our own weights: zoo mil bench's test bags
        model = zoo.create_model(f"{name}.{pretrained_tag}", pretrained=True)
        te_x, te_y = make_digit_bags(300, "test", seed=seed)
        model_kwargs: Dict[str, Any] = {}
        train: Dict[str, Any] = {"trained": False, "evaluated": f"300 test bags, seed {seed}"}
    else:
        tr_x, tr_y = make_digit_bags(train_bags, "train", seed=seed)
        te_x, te_y = make_digit_bags(test_bags, "test", seed=seed)
        model_kwargs = dict(in_dim=tr_x[0].shape[1], num_classes=2)
        model_kwargs["embed_dim"] = 32 if budget == "tiny" else 64  # 64: zoo mil bench's width
        torch.manual_seed(seed)
        model = zoo.create_model(name, **model_kwargs)
        train_mil(model, tr_x, tr_y, epochs, 1e-3, 1e-5, 8, seed, desc=name)
        train = {"trained": True, "epochs": epochs, "train_bags": len(tr_x), "bags_per_step": 8, "lr": 1e-3,
                 "weight_decay": 1e-5, "recipe": "zoo.tasks.mil.train_mil (CPU)"}
    ev = evaluate_mil(model, te_x, te_y)
    model.to(device)
    metrics = {"accuracy": ev["accuracy"], "auc": ev["auc"], "test_bags": len(te_x)}
    return dict(model=model, metric=("accuracy", True), metrics=metrics, train=train, model_kwargs=model_kwargs,
                data="digit bags (positive iff a 9 is in the bag), 8-48 instances of 64 features",
                batch=(list(te_x[:8]),), sample=([te_x[0]],), input_desc="bag of 8-48 x 64 features", unit="bags/s")


RUNNERS: Dict[str, Callable] = {
    "classification": run_classification,
    "point_classification": run_point_classification,
    "forecasting": run_forecasting,
    "ts_classification": run_ts_classification,
    "kws": lambda *a: _run_speech("kws", *a),
    "ctc_digits": lambda *a: _run_speech("digits", *a),
    "mil": run_mil,
}


# --- the bench ---------------------------------------------------------------------------------------------

def own_pretrained(pattern: str = "*") -> List[str]:
    """``name.tag`` entries whose weights are ours: the cfg's ``file`` (package data or a local path) and no
    remote source."""
    import zoo
    from zoo.registry import _resolve_cfg, split_model_name

    names = []
    for full in zoo.list_models(pattern, pretrained=True):
        arch, tag = split_model_name(full)
        cfg = _resolve_cfg(arch, tag)
        if cfg.get("file") and not (cfg.get("hf_hub_id") or cfg.get("url")):
            names.append(full)
    return names


def bench_entry(name: str, budget: str, device: str = "cpu", seed: int = 0, measure: bool = True) -> Dict[str, Any]:
    """One row: ``name`` ("arch" trained at ``budget``, or "arch.tag" with our weights evaluated)."""
    from zoo import model_info
    from zoo.registry import split_model_name

    arch, tag = split_model_name(name)
    task = task_of(arch)
    row: Dict[str, Any] = {"model": name, "task": task, "budget": budget if tag is None else "pretrained",
                           "device": device, "seed": seed}
    try:
        row["entry_params"] = model_info(arch)["num_params"]
    except Exception:  # the count is optional
        row["entry_params"] = None
    if task == "none":
        row.update(status="skipped", error=NO_TASK.get(arch, "no downstream task for this modality in zoo.tasks"))
        return row
    dev = torch.device(device)
    start = time.perf_counter()
    try:
        out = RUNNERS[task](arch, budget, dev, seed, tag)
        metric, higher = out["metric"]
        model = out["model"].to(dev)
        row.update(
            status="ok", data=out["data"], weights=(f"ours: {name} evaluated, not trained" if tag
                                                    else "random initialisation, trained at the budget"),
            metric={"name": metric, "value": out["metrics"][metric], "higher_is_better": higher},
            metrics=out["metrics"], train=out["train"], model_kwargs=out["model_kwargs"],
            params=_params(model), input=out["input_desc"],
        )
        forward_fn = out.get("forward") or (lambda mod, *args: mod(*args))
        if measure:
            sample = out["sample"]
            row["flops"] = count_flops(model, lambda mod: forward_fn(mod, *sample))
            row["flops_note"] = ("forward, batch 1, FlopCounterMode on the CPU path (matmul/conv/bmm/attention "
                                 "counted; elementwise ops and the scan's recurrence not)")
            batch = _to(out["batch"], dev)
            n = len(batch[0])
            m = measure_forward(model, lambda mod: forward_fn(mod, *batch), n, dev)
            row["throughput"] = {"samples_per_s": m["samples_per_s"], "unit": out["unit"], "batch": n,
                                 "reps": m["reps"], "mode": "inference (eval, torch.inference_mode)"}
            row["peak_memory_bytes"] = m["peak_memory_bytes"]
            row["peak_memory_method"] = m["peak_memory_method"]
    except Exception as e:  # the row records the failure; the bench goes on
        row.update(status="error", error=f"{type(e).__name__}: {e}",
                   traceback=traceback.format_exc(limit=-3))
    row["seconds"] = time.perf_counter() - start
    return row


def select_entries(patterns: Sequence[str] = ("*",)) -> List[str]:
    """Arch names and our own pretrained ``name.tag`` names matching any of ``patterns``."""
    import zoo

    names: List[str] = []
    for p in patterns:
        for n in zoo.list_models(p) + own_pretrained(p):
            if n not in names:
                names.append(n)
    return sorted(names)


def _fmt(v, spec: str = ".4f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def format_markdown(result: Dict[str, Any]) -> str:
    done = "" if result.get("complete", True) else f" (partial: {len(result['rows'])} of {len(result['entries'])} entries)"
    lines = [
        f"# zoo bench ({result['budget']} budget, {result['device']}){done}",
        "",
        f"Command: `{result['command']}`",
        "",
        f"torch {result['torch']}, {result['threads']} CPU thread(s), {result['machine']}. Metric: the task's test metric "
        "(higher is better unless marked ↓). FLOPs: " + result["flops_note"] + ". Throughput: inference, median of "
        "timed batches. Peak memory: " + result["peak_memory_method"] + ".",
        "",
        "| model | task | status | metric | value | params | entry params | MFLOPs | throughput | peak MiB | what ran |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | {r['task']} | {r['status']} | - | - | - | "
                         f"{_fmt(r.get('entry_params'), ',')} | - | - | - | {r['error'].splitlines()[0][:120]} |")
            continue
        m = r["metric"]
        tp = r.get("throughput")
        mem = r.get("peak_memory_bytes")
        kw = ", ".join(f"{k}={v}" for k, v in r["model_kwargs"].items())
        t = r["train"]
        ran = ("our weights, evaluated" if not t.get("trained") else
               ", ".join(f"{k} {t[k]}" for k in ("epochs", "limit_train_batches", "steps_per_epoch", "limit_batches")
                         if t.get(k) is not None))
        lines.append(
            f"| {r['model']} | {r['task']} | ok | {m['name']}{'' if m['higher_is_better'] else ' ↓'} | "
            f"{_fmt(m['value'])} | {r['params']:,} | {_fmt(r.get('entry_params'), ',')} | "
            f"{_fmt(r['flops'] / 1e6 if r.get('flops') is not None else None, ',.1f')} | "
            f"{_fmt(tp['samples_per_s'], '.1f') + ' ' + tp['unit'] if tp else '-'} | "
            f"{_fmt(mem / 2**20 if mem is not None else None, '.1f')} | {'; '.join(x for x in (ran, kw) if x)} |"
        )
    return "\n".join(lines) + "\n"


def run_bench(patterns: Sequence[str] = ("*",), budget: str = "quick", device: str = "cpu", output: Optional[str] = None,
              seed: int = 0, progress: bool = True, command: Optional[str] = None) -> Dict[str, Any]:
    """Bench every entry matching ``patterns``; writes ``bench.json`` and ``bench.md`` into ``output``."""
    if budget not in BUDGETS:
        raise ValueError(f"zoo bench: budget must be one of {BUDGETS}, got {budget!r}")
    names = select_entries(patterns)
    if not names:
        raise ValueError(f"zoo bench: no registered entry matches {list(patterns)}")
    dev = resolve_device(device)
    if output:  # before the first entry: a run is not thrown away because its table cannot be written
        prepare_output_dir(output, option="--output")
    rows: List[Dict[str, Any]] = []
    result = {
        "command": command, "budget": budget, "device": device, "seed": seed,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
        "flops_note": "forward, one sample at the task's input, FlopCounterMode on the CPU path (matmul, conv, bmm, "
                      "attention; elementwise ops and the selective scan's recurrence are not counted)",
        "peak_memory_method": ("torch.cuda.max_memory_allocated during inference" if dev.type == "cuda" else
                               "peak RSS increase during inference (VmHWM after malloc_trim and a /proc/self/clear_refs "
                               "reset; weights already resident are not counted)"),
        "budgets": {
            "tiny": "smoke test: narrowed widths, 1 epoch of at most 2 steps, small data",
            "quick": "the entry's registered width with fewer layers (kwargs in each row), at most a few dozen training "
                     "steps on small data: metrics near chance are expected",
            "full": "each task's default recipe (epochs, data) on the registered architecture, except where the task's "
                    "default sets it (Vim: zoo finetune's 6 blocks, 8x8 patches at 32x32; MIL: width 64)",
        },
        "entries": names,
        "complete": False,
        "rows": rows,
    }

    def save():
        if output:
            out = Path(output)
            write_text_atomic(out / "bench.json", json.dumps(result, indent=1, default=str) + "\n")
            write_text_atomic(out / "bench.md", format_markdown(result))

    bar = tqdm(names, desc="zoo bench", unit="entry", disable=not progress)
    for name in bar:
        bar.set_postfix_str(name)
        rows.append(bench_entry(name, budget, device, seed))
        bar.write(f"{name}: " + (f"{rows[-1]['metric']['name']} {rows[-1]['metric']['value']:.4f}"
                                 if rows[-1]["status"] == "ok" else f"{rows[-1]['status']}: {rows[-1]['error'][:100]}"))
        save()  # a run cut short keeps the rows it finished
    result["complete"] = True
    save()
    return result


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="every registered entry on its modality's task: metric, params, FLOPs, throughput, memory",
        description="Run every registered entry (or those matching --models) on its modality's downstream task at a "
                    "stated budget and write one results table as bench.json and bench.md. Entries with pretrained "
                    "weights of our own are also evaluated as they are.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--models", nargs="+", default=["*"], metavar="PATTERN", help="shell-style patterns, e.g. 'vim*' mambamil")
    p.add_argument("--budget", choices=BUDGETS, default="quick",
                   help="tiny: smoke test; quick: fewer layers, a few training steps; full: each task's default recipe")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--output", default="runs/bench", help="folder for bench.json and bench.md")
    p.add_argument("--seed", type=number_arg(int, 0), default=0)
    p.add_argument("--threads", type=number_arg(int, 1), default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cli_bench)


def _cli_bench(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_bench(args.models, args.budget, args.device, args.output, args.seed, progress=not args.no_progress,
                       command=getattr(args, "command_line", None))
    ok = sum(r["status"] == "ok" for r in result["rows"])
    print(f"{ok}/{len(result['rows'])} entries ran; wrote {Path(args.output) / 'bench.json'} and "
          f"{Path(args.output) / 'bench.md'}")
    return 0
