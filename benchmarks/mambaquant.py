"""Post-training quantization drop per zoo entry on its embedded task (zoo.research.mambaquant:
fake-quant simulation, every nn.Linear quantized, per-tensor static activation scales).

Entries (trained here from scratch on CPU, then quantized with calibration on 4 training batches):
  vim (vision)     tiny Vim on digits 16x16 (benchmarks/token_dynamics.py's baseline model), top-1
  mambamil (MIL)   MambaMIL (SR-Mamba mixers) on digit bags (zoo.tasks.mil), accuracy and AUC

    PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/mambaquant.py --out benchmarks/results/mambaquant.json
"""
from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from token_dynamics import MODEL_KWARGS, accuracy, digits_loaders, train_digits_vim
from zoo.research.mambaquant import quantize_model

SETTINGS = [("float", None, None), ("per_channel", 8, 8), ("hadamard", 8, 8), ("mambaquant", 8, 8),
            ("per_channel", 4, 8), ("hadamard", 4, 8), ("mambaquant", 4, 8),
            ("per_channel", 4, 4), ("hadamard", 4, 4), ("mambaquant", 4, 4)]


def vision_entry(epochs: int, seed: int):
    model = train_digits_vim({}, epochs, seed)
    train_loader, test_loader = digits_loaders(32, seed)
    calib = [x for x, _ in list(train_loader)[:4]]
    return model, calib, lambda m: {"accuracy": accuracy(m, test_loader)}, dict(model="vim_tiny", **MODEL_KWARGS)


def mil_entry(epochs: int, seed: int):
    from zoo.data.digit_bags import make_digit_bags
    from zoo.tasks.mil import build_bench_model, evaluate_mil, train_mil

    tr_x, tr_y = make_digit_bags(300, "train", bag_size=(8, 48), seed=seed)
    te_x, te_y = make_digit_bags(300, "test", bag_size=(8, 48), seed=seed)
    torch.manual_seed(seed)
    model = build_bench_model("mambamil", tr_x[0].shape[1], 2, 64, 5, 0.25)
    train_mil(model, tr_x, tr_y, epochs, 1e-3, 1e-5, 8, seed)
    calib = [(tr_x[i : i + 8],) for i in range(0, 32, 8)]
    return model, calib, lambda m: evaluate_mil(m, te_x, te_y), dict(model="mambamil", embed_dim=64, rate=5)


ENTRIES = {"vim": vision_entry, "mambamil": mil_entry}
EPOCHS = {"vim": 6, "mambamil": 10}  # the token-dynamics benchmark's and zoo.tasks.mil's schedules


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--entries", nargs="+", default=list(ENTRIES), choices=list(ENTRIES))
    p.add_argument("--epochs", type=int, default=None, help=f"training epochs before quantization (default: {EPOCHS})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows, results = [], []
    for entry in args.entries:
        start = time.perf_counter()
        epochs = args.epochs or EPOCHS[entry]
        model, calib, evaluate, config = ENTRIES[entry](epochs, args.seed)
        base = evaluate(model)
        for method, w_bits, a_bits in SETTINGS:
            q = model if method == "float" else quantize_model(copy.deepcopy(model), calib, method, w_bits, a_bits)
            metrics = base if method == "float" else evaluate(q)
            label = "float" if method == "float" else f"W{w_bits}A{a_bits} {method}"
            res = dict(entry=entry, setting=label, **metrics,
                       drop={k: round(100 * (base[k] - v), 2) for k, v in metrics.items()})
            print(json.dumps(res), flush=True)
            results.append(res)
            rows.append(f"| {entry} | {label} | " + ", ".join(f"{k} {100 * v:.2f}" for k, v in metrics.items()) + " | "
                        + ", ".join(f"{v:+.2f}" for v in res["drop"].values()) + " |")
        results.append(dict(entry=entry, config=config, epochs=epochs, seconds=round(time.perf_counter() - start, 1)))
    table = "\n".join(["| entry | setting | test metric (%) | drop vs float (points) |", "|---|---|---|---|", *rows])
    print(table)
    if args.out:
        Path(args.out).write_text(json.dumps(dict(
            command="PYTHONPATH=. python benchmarks/mambaquant.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
            note="fake-quant simulation; weights per output channel, activations per tensor (static, calibrated on 4 "
                 "training batches); every nn.Linear quantized, dt_proj weight-only; scan, convs and norms in float",
            seed=args.seed, threads=torch.get_num_threads(), torch=torch.__version__,
            results=results, table=table), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
