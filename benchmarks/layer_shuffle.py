"""Stochastic layer-wise token shuffle (ShuffleMamba) with and without, several seeds: one table from the runs'
result files.

    # vision: the main job at depth 12, 3 seeds, without and with the shuffle (last block's probability 0.5)
    for s in 0 1 2; do for p in 0 0.5; do
      zoo finetune --depth 12 --seed $s --layer-shuffle $p --no-progress --output runs/shuffle/d12_p${p}_s$s
    done; done
    # time series: S-Mamba on BasicMotions, 3 seeds each
    zoo tsc bench --layer-shuffle 0 --quiet --output runs/shuffle/tsc_p0.json
    zoo tsc bench --layer-shuffle 0.5 --quiet --output runs/shuffle/tsc_p0.5.json
    python benchmarks/layer_shuffle.py --finetune runs/shuffle/d12_*/result.json --tsc runs/shuffle/tsc_*.json \\
        --out benchmarks/results/layer_shuffle.json

Results: benchmarks/results/layer_shuffle.md (the markdown this prints) and layer_shuffle.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict


def _summary(accs):
    return {"test_acc": accs, "mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--finetune", nargs="*", default=[], help="result.json files of zoo finetune runs")
    ap.add_argument("--tsc", nargs="*", default=[], help="JSON files of zoo tsc bench runs")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    groups = defaultdict(list)
    for path in args.finetune:
        r = json.load(open(path))
        groups[(r["model"], r["config"]["depth"], r["config"]["layer_shuffle"])].append((r["config"]["seed"], r["accuracy"], r["command"]))
    for (model, depth, p), runs in sorted(groups.items()):
        runs.sort()
        rows.append({"task": f"digits, {model} depth {depth}", "layer_shuffle": p, "seeds": [s for s, _, _ in runs],
                     **_summary([a for _, a, _ in runs]), "commands": [c for _, _, c in runs]})
    for path in args.tsc:
        r = json.load(open(path))
        m = next(x for x in r["rows"] if x["model"] == "smamba_classifier")
        rows.append({"task": f"{r['dataset']}, S-Mamba classifier", "layer_shuffle": r["settings"]["layer_shuffle"],
                     "seeds": r["settings"]["seeds"], **_summary(m["test_acc"]), "commands": [r["command"]]})
    print("| task | layer shuffle | test accuracy mean | std | per seed |\n|---|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['task']} | {r['layer_shuffle']} | {r['mean']:.4f} | {r['std']:.4f} | "
              f"{', '.join(f'{a:.4f}' for a in r['test_acc'])} |")
    if args.out:
        json.dump({"rows": rows}, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
