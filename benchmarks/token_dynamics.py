"""Do the token-dynamics refinements (Vo et al., ICLR 2025) help? A tiny Vim trained from scratch on
the embedded digits task (16x16, 4x4 patches: 16 tokens + class token; depth 2, width 48, so that
it trains in minutes on a shared CPU) in five variants, same seeds and data order:

  baseline        plain BiMamba mixers (S_C, S_B free: the scenario is whatever training makes it)
  convergent      bc_sign='negative': S_C^T S_B negative semi-definite, the scenario the paper says hurts
  positive        bc_sign='positive': refinement 1, the convergent scenario excluded
  reorder         reorder_tokens: refinement 2, tokens scanned by importance score
  positive+reorder both refinements

Writes a JSON with per-seed test accuracy and the final scenario count of each run, and prints a
markdown table. CPU, a few minutes:

    PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/token_dynamics.py --epochs 6 --seeds 0 1 2 \
        --out benchmarks/results/token_dynamics_digits.json
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import zoo
from zoo.data import create_dataset
from zoo.research.token_dynamics import enable_refinements, token_dynamics_report

VARIANTS = {
    "baseline": dict(),
    "convergent": dict(bc_sign="negative"),
    "positive": dict(bc_sign="positive"),
    "reorder": dict(reorder_tokens=True),
    "positive+reorder": dict(bc_sign="positive", reorder_tokens=True),
}
MODEL_KWARGS = dict(img_size=16, patch_size=4, stride=4, depth=2, embed_dim=48, num_classes=10, drop_path_rate=0.0)


def digits_loaders(batch_size: int, seed: int):
    train = create_dataset("digits", "train", img_size=MODEL_KWARGS["img_size"], seed=0)
    test = create_dataset("digits", "test", img_size=MODEL_KWARGS["img_size"], seed=0)
    return (DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(seed)),
            DataLoader(test, batch_size=256))


@torch.no_grad()
def accuracy(model, loader) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += (model(x).argmax(-1) == y).sum().item()
        total += y.numel()
    return correct / total


def train_digits_vim(refinements: dict, epochs: int, seed: int, lr: float = 2e-3, batch_size: int = 64,
                     share_layers: bool = False):
    """A tiny Vim (``MODEL_KWARGS``) with the given refinements, AdamW + cosine schedule; returns the model.
    ``share_layers``: one block applied ``depth`` times, the paper's setting (its token dynamics are an ODE
    over depth with the same parameters at every layer; the residual stream is the Euler step)."""
    torch.manual_seed(seed)
    model = zoo.create_model("vim_tiny", **MODEL_KWARGS)
    if share_layers:
        for i in range(1, len(model.layers)):
            model.layers[i] = model.layers[0]
    model = enable_refinements(model, **refinements)
    train_loader, _ = digits_loaders(batch_size, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * len(train_loader), pct_start=0.1)
    for _ in range(epochs):
        model.train()
        for x, y in train_loader:
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
    return model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--depth", type=int, default=MODEL_KWARGS["depth"], help="Vim depth (the paper's dynamics are over depth)")
    p.add_argument("--share-layers", action="store_true", help="one block applied depth times (the paper's setting)")
    p.add_argument("--out", default=None, help="JSON file to write")
    args = p.parse_args(argv)
    MODEL_KWARGS["depth"] = args.depth
    _, test_loader = digits_loaders(64, 0)
    runs = []
    for variant in args.variants:
        for seed in args.seeds:
            start = time.perf_counter()
            model = train_digits_vim(VARIANTS[variant], args.epochs, seed, share_layers=args.share_layers)
            scenarios = [r.scenario for r in token_dynamics_report(model)]
            run = dict(variant=variant, seed=seed, accuracy=accuracy(model, test_loader),
                       divergent=scenarios.count("divergent"), convergent=scenarios.count("convergent"),
                       seconds=round(time.perf_counter() - start, 1))
            print(json.dumps(run), flush=True)
            runs.append(run)
    rows = ["| variant | test accuracy (mean ± std over seeds) | per seed | directions divergent / convergent after training |",
            "|---|---|---|---|"]
    for variant in args.variants:
        accs = [r["accuracy"] for r in runs if r["variant"] == variant]
        last = [r for r in runs if r["variant"] == variant]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        div = "; ".join(f"{r['divergent']}/{r['convergent']}" for r in last)
        rows.append(f"| {variant} | {100 * statistics.mean(accs):.2f} ± {100 * std:.2f} | "
                    f"{', '.join(f'{100 * a:.1f}' for a in accs)} | {div} |")
    table = "\n".join(rows)
    print(table)
    if args.out:
        result = dict(command="PYTHONPATH=. python benchmarks/token_dynamics.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
                      model="vim_tiny", model_kwargs=MODEL_KWARGS, share_layers=args.share_layers, epochs=args.epochs,
                      seeds=args.seeds,
                      threads=torch.get_num_threads(), torch=torch.__version__, runs=runs, table=table)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
