"""The pretrained entries trained here: their recipes, packaging and evaluation (``zoo pretrained ...``).

Each shipped tag (``vim_tiny.digits``, ``pointmamba_tiny.shapes3d``, ...) is a small model trained on its
modality's embedded task by the recipe ``configs/pretrained/<tag>.yaml``:

- ``train`` is the task command that trains it and writes its result JSON and weights (``--save-weights``);
- ``zoo pretrained package WEIGHTS TAG`` stores them as float16 safetensors in ``zoo/weights/<tag>.safetensors``
  (package data; a float16 file loads into the float32 model) and prints the sha256 for the tag's cfg;
- ``zoo pretrained eval TAG --output benchmarks/results/pretrained_<tag>.json`` loads the packaged weights
  through ``zoo.create_model(TAG, pretrained=True)`` (no network, strict, sha256 checked) and measures them on
  the task's test split, which is what the model card reports. The JSON also records the model's outputs on a
  few fixed inputs (``reference_input``), which the tests compare against without the task data.

``zoo pretrained train RECIPE`` runs a recipe's training command and packages the weights.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

__all__ = ["SHIPPED", "evaluate_pretrained", "reference_input", "reference_outputs", "package_weights", "load_recipe"]

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "configs" / "pretrained"
WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"


# --- evaluation on each task's test split ----------------------------------------------------------------

@torch.no_grad()
def _eval_digits(model) -> Dict[str, Any]:
    from torch.utils.data import DataLoader

    from zoo.data import create_dataset

    cfg = model.pretrained_cfg
    # The finetune job's test split: stratified 20 %, seed 0, upsampled to the tag's input size, the entry's mean/std.
    test = create_dataset("digits", "test", img_size=cfg["input_size"][-1], mean=cfg["mean"], std=cfg["std"], seed=0)
    preds, labels = [], []
    for images, y in DataLoader(test, batch_size=128):
        preds.append(model(images).argmax(-1))
        labels.append(y)
    preds, labels = torch.cat(preds), torch.cat(labels)
    return {"metric": "accuracy", "accuracy": int((preds == labels).sum()) / len(labels), "test_samples": len(labels),
            "data": "scikit-learn digits, test split (360 images, stratified 20 %, seed 0), 32x32"}


def _eval_shapes3d(model) -> Dict[str, Any]:
    from zoo.data.shapes3d import make_shapes3d
    from zoo.tasks.point_classification import evaluate

    # `zoo points bench` defaults: 60 test clouds per class of 512 points, test seed 2000.
    x, y = make_shapes3d(60, 512, seed=2000)
    out = evaluate(model, x, y, 64, "cpu")
    return {"metric": "overall_accuracy", **out, "test_samples": len(y),
            "data": "Shapes3D (zoo.data.shapes3d), test split: 60 clouds per class x 5 classes, 512 points, seed 2000"}


def _eval_digit_bags(model) -> Dict[str, Any]:
    from zoo.data.digit_bags import make_digit_bags
    from zoo.tasks.mil import evaluate_mil

    # `zoo mil bench` defaults for seed 0: 300 test bags of 8-48 digit images.
    bags, labels = make_digit_bags(300, "test", bag_size=(8, 48), seed=0)
    return {"metric": "accuracy", **evaluate_mil(model, bags, labels), "test_samples": len(labels),
            "data": "digit bags (zoo.data.digit_bags), test split: 300 bags of 8-48 test-split digits, seed 0"}


@torch.no_grad()
def _eval_basicmotions(model) -> Dict[str, Any]:
    from zoo.data.timeseries import load_classification_set

    X, y, _ = load_classification_set("BasicMotions", "test")
    model.eval()
    acc = int((model(torch.as_tensor(X)).argmax(1) == torch.as_tensor(y)).sum()) / len(y)
    return {"metric": "accuracy", "accuracy": acc, "test_samples": len(y),
            "data": "UEA BasicMotions (aeon's copy), official test split (40 series, 100 steps, 6 variates)"}


def _eval_speech(task: str, n_strings: int = 1200, beam: int = 1) -> Callable:
    def run(model) -> Dict[str, Any]:
        from zoo.data.speech import build_corpus
        from zoo.tasks.speech import _loaders, evaluate

        # The corpus the tag was trained on (seed 0; `zoo speech` defaults to 1200 strings), held-out-voice test split.
        corpus = build_corpus(task, None, n_strings=n_strings, seed=0, progress=False)
        _, test_loader = _loaders(task, corpus, 32, 0)
        out = evaluate(task, model, test_loader)  # greedy decoding: the tag's metric
        if beam > 1:  # encoder-decoder tags: beam search too, as their training command reported it
            start = time.perf_counter()
            out["beam"] = dict(beam=beam, **evaluate(task, model, test_loader, beam=beam),
                               eval_seconds=round(time.perf_counter() - start, 1))
        size = {"digits": f", {n_strings:,} digit strings", "sentences": f", {n_strings:,} words and sentences"}.get(task, "")
        return {"metric": "accuracy" if task == "kws" else "cer", **out, "test_samples": len(test_loader.dataset),
                "data": f"espeak-ng {task} corpus (zoo.data.speech{size}), held-out voices"}
    return run


# The byte-level LMs (mamba_tiny_lm, mamba2_tiny_lm) trained by benchmarks/train_lm.py on the King James Bible: held-out
# perplexity on its test books at the training length.
KJV_EVAL_LENGTH = 512


@torch.no_grad()
def _eval_kjv(model) -> Dict[str, Any]:
    from zoo.data.kjv import kjv_splits
    from zoo.tasks.language_modeling import evaluate_lm

    # The installed Debian text (bible-kjv-text, read through its `bible` program), or a copy named by ZOO_KJV_TEXT.
    splits = kjv_splits(os.environ.get("ZOO_KJV_TEXT") or None)
    out = evaluate_lm(model.eval(), splits.test, KJV_EVAL_LENGTH, batch_size=8)
    return {"metric": "bits_per_byte", "bits_per_byte": out["bpb"], "perplexity_per_byte": out["ppl"],
            "nll_nats_per_byte": out["nll"], "test_samples": out["bytes"],
            "data": f"King James Bible (Debian bible-kjv-text), test books {', '.join(splits.books['test'])}: every byte "
                    f"but the first scored once, windows of {KJV_EVAL_LENGTH} bytes"}


# tag -> (evaluation on the test split, fixed inputs for the reference outputs)
SHIPPED: Dict[str, Callable] = {
    "vim_tiny.digits": _eval_digits,
    "pointmamba_tiny.shapes3d": _eval_shapes3d,
    "mambamil.digit_bags": _eval_digit_bags,
    "smamba_classifier.basicmotions": _eval_basicmotions,
    "mamba_kws_tiny.kws": _eval_speech("kws"),
    "mamba_ctc_causal_tiny.digits": _eval_speech("digits", n_strings=3000),  # its recipe's corpus
    "mamba_ctc_tiny.sentences": _eval_speech("sentences", n_strings=3000),  # its recipe's corpus; greedy CTC
    "samba_asr_tiny.sentences": _eval_speech("sentences", n_strings=3000, beam=4),  # greedy (the metric) and beam 4
    "mamba_tiny_lm.kjv": _eval_kjv,
    "mamba2_tiny_lm.kjv": _eval_kjv,
}


def reference_input(name: str):
    """Fixed inputs (seeded noise of the tag's input shape) whose outputs the eval JSON records."""
    g = torch.Generator().manual_seed(0)
    arch = name.split(".")[0]
    if arch == "vim_tiny":
        return (torch.randn(2, 3, 32, 32, generator=g),)
    if arch == "pointmamba_tiny":
        return (torch.randn(2, 512, 3, generator=g) * 0.5,)
    if arch == "mambamil":
        return ([torch.randn(n, 64, generator=g) for n in (9, 20)],)
    if arch == "smamba_classifier":
        return (torch.randn(2, 100, 6, generator=g),)
    if arch in ("mamba_tiny_lm", "mamba2_tiny_lm"):
        return (torch.randint(0, 256, (2, 64), generator=g),)
    if arch in ("mamba_kws_tiny", "mamba_ctc_causal_tiny", "mamba_ctc_tiny"):
        return (torch.randn(2, 16000, generator=g) * 0.1, torch.tensor([16000, 12000]))
    if arch == "samba_asr_tiny":  # waveforms, lengths and teacher-forced decoder tokens (start token, then characters)
        waves = torch.randn(2, 16000, generator=g) * 0.1
        return (waves, torch.tensor([16000, 12000]), torch.tensor([[29, 21, 9, 6, 1], [29, 4, 15, 8, 1]]))
    raise KeyError(f"no reference input for {name!r}; shipped tags: {', '.join(SHIPPED)}")


@torch.no_grad()
def reference_outputs(model, name: str) -> list:
    model.eval()
    out = model(*reference_input(name))
    if isinstance(out, tuple):  # CTC heads: (log_probs, frames)
        out = out[0]
    return [[round(v, 5) for v in row] for row in out.float().flatten(1)[:, :64].tolist()]


def _float_dtype(state_dict) -> str:
    """The dtype of a state dict's floating tensors (integer buffers such as BatchNorm's counters aside)."""
    dtypes = {str(v.dtype).replace("torch.", "") for v in state_dict.values() if v.is_floating_point()}
    return ", ".join(sorted(dtypes))


def evaluate_pretrained(name: str, output: Optional[str] = None, command: Optional[str] = None) -> Dict[str, Any]:
    """Load the shipped ``name`` with pretrained=True (packaged file, sha256 checked, strict) and test it."""
    import zoo
    from zoo.hub import resolve_pretrained
    from zoo.tasks.engine import check_output_file, write_text_atomic

    if name not in SHIPPED:
        raise ValueError(f"zoo pretrained eval: {name!r} is not a tag trained here; expected one of {', '.join(SHIPPED)}")
    if output:  # before the evaluation: its result is not thrown away because the file cannot be written
        check_output_file(output)
    model = zoo.create_model(name, pretrained=True).eval()
    path = resolve_pretrained(model.pretrained_cfg)
    start = time.perf_counter()
    result = SHIPPED[name](model)
    result = {
        "model": name, "command": command, **result,
        "weights": f"zoo/{model.pretrained_cfg['file']}", "sha256": model.pretrained_cfg["sha256"],
        "weights_dtype": _float_dtype(zoo.hub.load_checkpoint(path)),
        "params": sum(p.numel() for p in model.parameters()),
        "model_kwargs": model.pretrained_cfg.get("model_kwargs") or {},
        "eval_seconds": round(time.perf_counter() - start, 1), "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "reference_outputs": reference_outputs(model, name),
    }
    print(f"{name}: {result['metric']} {result[result['metric']]:.4f} on {result['test_samples']} test samples")
    if output:
        write_text_atomic(output, json.dumps(result, indent=1) + "\n")
    return result


# --- recipes and packaging -------------------------------------------------------------------------------

def load_recipe(path) -> Dict[str, Any]:
    import yaml

    recipe = yaml.safe_load(Path(path).read_text())
    missing = [k for k in ("name", "task", "data", "train", "train_result", "weights", "evaluate") if k not in recipe]
    if missing:
        raise ValueError(f"recipe {path}: missing keys {missing}")
    return recipe


def package_weights(src, name: str, dtype: torch.dtype = torch.float16, out_dir=None) -> Path:
    """Store the state dict of ``src`` as ``<out_dir>/<name>.safetensors`` in ``dtype``; prints its sha256."""
    from zoo.hub import file_sha256, load_checkpoint, save_state_dict

    state = load_checkpoint(src)
    dst = save_state_dict(state, Path(out_dir or WEIGHTS_DIR) / f"{name}.safetensors", dtype=dtype)
    print(f"{dst}: {dst.stat().st_size / 1e6:.2f} MB, sha256 {file_sha256(dst)}")
    return dst


def _cli_package(args) -> int:
    package_weights(args.weights, args.name, getattr(torch, args.dtype), args.out_dir)
    return 0


def _cli_eval(args) -> int:
    evaluate_pretrained(args.name, args.output, command=getattr(args, "command_line", None))
    return 0


def _cli_train(args) -> int:
    import subprocess

    recipe = load_recipe(args.recipe)
    argv = shlex.split(recipe["train"])
    if argv[0] == "zoo":
        argv = [sys.executable, "-m", "zoo", *argv[1:]]
    elif argv[:2] == ["python", "-m"] and argv[2].startswith("zoo"):
        argv = [sys.executable, *argv[1:]]
    else:
        raise ValueError(f"recipe {args.recipe}: train must be a `zoo ...` or `python -m zoo...` command, got {recipe['train']!r}")
    rc = subprocess.run(argv).returncode
    if rc:
        return rc
    package_weights(recipe["weights"], recipe["name"])
    print(f"now set the sha256 above in {recipe['name']}'s pretrained cfg and run: {recipe['evaluate']}")
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("pretrained", help="the tags trained here: train by recipe, package, evaluate")
    sub = p.add_subparsers(dest="pretrained_command", required=True)
    t = sub.add_parser("train", help="run a recipe (configs/pretrained/*.yaml): train, then package the weights")
    t.add_argument("recipe")
    t.set_defaults(func=_cli_train)
    k = sub.add_parser("package", help="store trained weights as package data (float16 safetensors) and print sha256")
    k.add_argument("weights", help="state dict written by a task's --save-weights / --output")
    k.add_argument("name", help="the tag, e.g. vim_tiny.digits")
    k.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    k.add_argument("--out-dir", default=None, help=f"default: {WEIGHTS_DIR}")
    k.set_defaults(func=_cli_package)
    e = sub.add_parser("eval", help="load a shipped tag offline and measure it on its task's test split")
    e.add_argument("name", choices=sorted(SHIPPED))
    e.add_argument("--output", default=None, help="write the result JSON here")
    e.set_defaults(func=_cli_eval)


if __name__ == "__main__":  # `python -m zoo.tasks.pretrained eval ...`, the same as `zoo pretrained eval ...`
    parser = argparse.ArgumentParser(prog="python -m zoo.tasks.pretrained")
    add_cli(parser.add_subparsers(dest="command", required=True))
    cli_args = parser.parse_args(["pretrained", *sys.argv[1:]])
    cli_args.command_line = "python -m zoo.tasks.pretrained " + shlex.join(sys.argv[1:])
    sys.exit(cli_args.func(cli_args))
