"""MIL benchmark: MambaMIL, ABMIL and TransMIL trained the same way on a bag task built from real
images (scikit-learn's digits: a bag is positive iff it holds a 9; see zoo.data.digit_bags).

Every model gets the same bags, optimiser (Adam, weight decay 1e-5 as in MambaMIL's scripts; lr
1e-3 rather than their 2e-4 because these runs are 10 epochs, not 200), epochs, batch of bags and
seeds; bags of a batch are packed into one sequence.
``zoo mil bench`` prints the table and can write it as JSON.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from zoo.core.checks import check_int
from zoo.data.digit_bags import make_digit_bags
from zoo.models.mil import ABMIL, MambaMIL, TransMIL
from zoo.tasks.engine import check_fields, check_output_file, number_arg, resolve_device, write_text_atomic

# What each numeric argument of the benchmark and of extraction allows (number_arg / check_fields keywords).
BENCH_LIMITS = dict(
    epochs=dict(kind=int, low=1), train_bags=dict(kind=int, low=1), test_bags=dict(kind=int, low=1),
    embed_dim=dict(kind=int, low=1), rate=dict(kind=int, low=1), drop_rate=dict(kind=float, low=0, high=1, high_open=True),
    lr=dict(kind=float, low=0, low_open=True), weight_decay=dict(kind=float, low=0), batch_size=dict(kind=int, low=1),
)
EXTRACT_LIMITS = dict(
    magnification=dict(kind=float, low=0, low_open=True), tile_size=dict(kind=int, low=1),
    batch_size=dict(kind=int, low=1), min_tissue=dict(kind=float, low=0, high=1),
)

# Benchmark entries: name -> (class, kwargs); all share in_dim, num_classes and embed_dim.
BENCH_MODELS = {
    "mambamil": (MambaMIL, {"mixer": "srmamba"}),
    "mambamil_mamba": (MambaMIL, {"mixer": "mamba"}),
    "abmil": (ABMIL, {"gated": True}),
    "transmil": (TransMIL, {}),
}


def build_bench_model(name: str, in_dim: int, num_classes: int, embed_dim: int, rate: int, drop_rate: float):
    if name not in BENCH_MODELS:
        raise ValueError(f"mil task: unknown model {name!r}; choose from {sorted(BENCH_MODELS)}")
    cls, kwargs = BENCH_MODELS[name]
    if cls is MambaMIL:
        kwargs = dict(kwargs, rate=rate)
    return cls(in_dim=in_dim, num_classes=num_classes, embed_dim=embed_dim, drop_rate=drop_rate, **kwargs)


def binary_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic: P(score_pos > score_neg) + P(tie) / 2."""
    scores, labels = np.asarray(scores), np.asarray(labels)
    pos, neg = scores[labels == 1], scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("binary_auc: needs both positive and negative examples")
    # O(n log n) time, O(n) memory: for each positive, the negatives below it and the ties come
    # from two binary searches in the sorted negatives; 2 * wins + ties is an integer, so the sum
    # is exact. A NaN score wins and ties against nothing but stays in the denominator (NaNs sort
    # last in the negatives; NaN positives are left out of the searches).
    n_pos, neg = len(pos), np.sort(neg)
    pos = pos[~np.isnan(pos)]
    twice = (np.searchsorted(neg, pos, "left").sum(dtype=np.int64)
             + np.searchsorted(neg, pos, "right").sum(dtype=np.int64))
    return float(twice / (2.0 * n_pos * len(neg)))


@torch.no_grad()
def evaluate_mil(model, bags: Sequence[torch.Tensor], labels: torch.Tensor, batch_size: int = 32) -> Dict[str, float]:
    model.eval()
    logits = torch.cat([model(list(bags[i : i + batch_size])) for i in range(0, len(bags), batch_size)])
    prob = torch.softmax(logits.float(), dim=1)[:, 1].numpy()
    y = labels.numpy()
    return {"accuracy": float(((prob > 0.5) == y).mean()), "auc": binary_auc(prob, y)}


def train_mil(model, bags, labels, epochs: int, lr: float, weight_decay: float, batch_size: int, seed: int, desc: str = "train"):
    """Cross-entropy training over shuffled batches of bags, each batch packed into one sequence."""
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    steps = (len(bags) + batch_size - 1) // batch_size
    model.train()
    with tqdm(total=epochs * steps, desc=desc, unit="step", leave=False) as bar:
        for _ in range(epochs):
            order = torch.randperm(len(bags), generator=g).tolist()
            for s in range(steps):
                idx = order[s * batch_size : (s + 1) * batch_size]
                loss = F.cross_entropy(model([bags[i] for i in idx]), labels[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")


def run_mil_benchmark(
    models: Sequence[str] = ("mambamil", "abmil", "transmil"),
    seeds: Sequence[int] = (0, 1, 2),
    epochs: int = 10,
    train_bags: int = 300,
    test_bags: int = 300,
    bag_size=(8, 48),
    embed_dim: int = 64,
    rate: int = 5,
    drop_rate: float = 0.25,
    lr: float = 1e-3,
    weight_decay: float = 1e-5,
    batch_size: int = 8,
    output: Optional[str] = None,
    command: Optional[str] = None,
    save_weights: Optional[str] = None,
) -> dict:
    """Train and test each model on digit bags for each seed; returns (and prints) the table.

    ``save_weights`` (one model, one seed) writes the trained model's state dict (safetensors).
    """
    if save_weights and (len(models) != 1 or len(seeds) != 1):
        raise ValueError(f"mil bench: --save-weights needs one model and one seed, got models {list(models)} "
                         f"and seeds {list(seeds)}")
    check_fields("mil bench", argparse.Namespace(**locals()), BENCH_LIMITS)
    for seed in seeds:
        check_int("mil bench: seed", seed, 0)
    lo, hi = bag_size
    if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
        raise ValueError(f"mil bench: bag_size must be (min, max) integers with 1 <= min <= max, got {tuple(bag_size)}")
    for option, path in (("--output", output), ("--save-weights", save_weights)):
        if path:  # before any training: a run is not thrown away because its results cannot be written
            check_output_file(path, option)
    runs: List[dict] = []
    for seed in seeds:
        tr_x, tr_y = make_digit_bags(train_bags, "train", bag_size=tuple(bag_size), seed=seed)
        te_x, te_y = make_digit_bags(test_bags, "test", bag_size=tuple(bag_size), seed=seed)
        for name in models:
            torch.manual_seed(seed)
            model = build_bench_model(name, tr_x[0].shape[1], 2, embed_dim, rate, drop_rate)
            t0 = time.time()
            train_mil(model, tr_x, tr_y, epochs, lr, weight_decay, batch_size, seed, desc=f"{name} seed {seed}")
            runs.append(dict(model=name, seed=seed, train_seconds=round(time.time() - t0, 1),
                             params=sum(p.numel() for p in model.parameters()), **evaluate_mil(model, te_x, te_y)))
    rows = []
    for name in models:
        mine = [r for r in runs if r["model"] == name]
        row = {"model": name, "params": mine[0]["params"]}
        for key in ("accuracy", "auc", "train_seconds"):
            vals = np.array([r[key] for r in mine], dtype=float)
            row[f"{key}_mean"], row[f"{key}_std"] = round(float(vals.mean()), 4), round(float(vals.std()), 4)
        rows.append(row)
    result = dict(
        task="digit bags: positive iff the bag holds a 9 (scikit-learn digits, disjoint train/test images)",
        command=command,
        config=dict(seeds=list(seeds), epochs=epochs, train_bags=train_bags, test_bags=test_bags, bag_size=list(bag_size),
                    embed_dim=embed_dim, rate=rate, drop_rate=drop_rate, lr=lr, weight_decay=weight_decay,
                    batch_size=batch_size, torch=torch.__version__, threads=torch.get_num_threads()),
        rows=rows, runs=runs,
    )
    print(format_table(result))
    if output:
        write_text_atomic(output, json.dumps(result, indent=1) + "\n")
    if save_weights:
        from zoo.hub import save_state_dict

        save_state_dict(model, save_weights)
    return result


def format_table(result: dict) -> str:
    n = len(result["config"]["seeds"])
    lines = [f"| model | params | test accuracy (mean ± std, {n} seeds) | test AUC | train s / seed |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['params']:,} | {r['accuracy_mean']:.4f} ± {r['accuracy_std']:.4f} | "
                     f"{r['auc_mean']:.4f} ± {r['auc_std']:.4f} | {r['train_seconds_mean']:.0f} |")
    return "\n".join(lines)


def add_cli(subparsers) -> None:
    def limit(name: str, table=BENCH_LIMITS):
        return number_arg(**table[name])

    p = subparsers.add_parser("mil", help="multiple-instance learning: benchmarks and whole-slide feature extraction")
    sub = p.add_subparsers(dest="mil_command", required=True)
    b = sub.add_parser("bench", help="train MambaMIL / ABMIL / TransMIL the same way on digit bags and compare")
    b.add_argument("--models", nargs="+", default=["mambamil", "abmil", "transmil"], choices=sorted(BENCH_MODELS))
    b.add_argument("--seeds", nargs="+", type=number_arg(int, low=0), default=[0, 1, 2])
    b.add_argument("--epochs", type=limit("epochs"), default=10)
    b.add_argument("--train-bags", type=limit("train_bags"), default=300)
    b.add_argument("--test-bags", type=limit("test_bags"), default=300)
    b.add_argument("--bag-size", nargs=2, type=number_arg(int, low=1), default=[8, 48], metavar=("MIN", "MAX"))
    b.add_argument("--embed-dim", type=limit("embed_dim"), default=64)
    b.add_argument("--rate", type=limit("rate"), default=5, help="SR-Mamba reordering rate")
    b.add_argument("--batch-size", type=limit("batch_size"), default=8, help="bags per step (packed into one sequence)")
    b.add_argument("--lr", type=limit("lr"), default=1e-3)
    b.add_argument("--output", default=None, help="write the table as JSON here")
    b.add_argument("--save-weights", default=None, help="write the trained model's state dict here (safetensors; one model, one seed)")
    b.set_defaults(func=_cli_bench)
    e = sub.add_parser("extract", help="tile whole-slide images and cache their bag features (safetensors, resumable)")
    e.add_argument("slides", nargs="+", help="slide files OpenSlide can read")
    e.add_argument("--out", required=True, help="directory of <slide>.safetensors bags")
    e.add_argument("--backbone", default="resnet50", help="timm or zoo model name")
    e.add_argument("--no-pretrained", action="store_true", help="random backbone weights (tests, smoke runs)")
    e.add_argument("--magnification", type=limit("magnification", EXTRACT_LIMITS), default=20.0)
    e.add_argument("--tile-size", type=limit("tile_size", EXTRACT_LIMITS), default=224)
    e.add_argument("--batch-size", type=limit("batch_size", EXTRACT_LIMITS), default=64)
    e.add_argument("--min-tissue", type=limit("min_tissue", EXTRACT_LIMITS), default=0.5, help="keep tiles with at least this tissue fraction")
    e.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    e.set_defaults(func=_cli_extract)


def _cli_bench(args: argparse.Namespace) -> int:
    run_mil_benchmark(args.models, args.seeds, args.epochs, args.train_bags, args.test_bags, args.bag_size,
                      args.embed_dim, args.rate, lr=args.lr, batch_size=args.batch_size, output=args.output,
                      command=getattr(args, "command_line", None) or "zoo " + shlex.join(sys.argv[1:]),
                      save_weights=args.save_weights)
    return 0


def _cli_extract(args: argparse.Namespace) -> int:
    from zoo.data.wsi import extract_features  # needs the wsi extra (OpenSlide)

    resolve_device(args.device)

    paths = extract_features(args.slides, args.backbone, args.out, pretrained=not args.no_pretrained,
                             magnification=args.magnification, tile_size=args.tile_size, batch_size=args.batch_size,
                             min_tissue=args.min_tissue, device=args.device)
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":  # `python -m zoo.tasks.mil bench ...`, the same as `zoo mil bench ...`
    parser = argparse.ArgumentParser(prog="python -m zoo.tasks.mil")
    add_cli(parser.add_subparsers(dest="command", required=True))
    cli_args = parser.parse_args(["mil", *sys.argv[1:]])
    cli_args.command_line = "python -m zoo.tasks.mil " + shlex.join(sys.argv[1:])
    sys.exit(cli_args.func(cli_args))
