"""Passkey retrieval at growing lengths: MemMamba (zoo.research.memmamba) vs plain Mamba of equal size
(same depth, width raised to match the parameter count), trained by a recipe in configs/
(passkey_memmamba.yaml: GPU; passkey_smoke.yaml: CPU).

A sequence is filler tokens with a marker and one passkey digit inserted at a uniformly random place,
ending in a query token; the model must name the digit at the query (10 classes, chance 10%). Training
lengths are drawn from [L // 4, L] with L = train_length, or L rising from task.start_length over the
first train.length_warmup of the steps (a curriculum); evaluation runs at each of ``eval_lengths``
(longer than training: length extrapolation). Also reports the memory-fidelity metrics of the trained
models (horizontal of layer 0 at distances 1, 16, 64; vertical per layer) on one evaluation batch.

    PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/passkey.py --config configs/passkey_smoke.yaml \
        --out benchmarks/results/passkey_smoke_cpu.json

State capacity (Stuffed Mamba, Chen et al. 2024: the longest passkey length a recurrent state of a given size
retrieves): ``--state-sizes 4 8 16 32`` trains the recipe's plain Mamba once per d_state instead (no memory, the
recipe's width) and reports, per state size, the accuracy at each evaluation length and the capacity, the longest
evaluation length up to which accuracy stays >= ``--capacity-accuracy`` (zoo.research.long_context.state_capacity).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from zoo.research.long_context import state_capacity
from zoo.research.memmamba import MemMambaModel, horizontal_fidelity, vertical_fidelity

DIGITS, FILLER = 10, 10  # token ids: digits 0..9, filler 10..19, marker 20, query 21
MARKER, QUERY, VOCAB = 20, 21, 22


def passkey_batch(batch: int, length: int, gen: torch.Generator, device="cpu"):
    """(tokens (batch, length), labels (batch,)): marker + digit at a random place, query last."""
    if length < 4:
        raise ValueError(f"passkey_batch: length must be >= 4, got {length}")
    tokens = torch.randint(DIGITS, DIGITS + FILLER, (batch, length), generator=gen)
    labels = torch.randint(0, DIGITS, (batch,), generator=gen)
    where = torch.randint(0, length - 2, (batch,), generator=gen)
    rows = torch.arange(batch)
    tokens[rows, where] = MARKER
    tokens[rows, where + 1] = labels
    tokens[:, -1] = QUERY
    return tokens.to(device), labels.to(device)


def n_params(model) -> int:
    return sum(q.numel() for q in model.parameters())


def build(name: str, cfg: dict) -> MemMambaModel:
    """``memmamba`` as configured; ``mamba``: no memory, width raised (in steps of 2) to the parameter
    count closest to MemMamba's, so the two are of equal size."""
    if name not in ("memmamba", "mamba"):
        raise ValueError(f"passkey: model must be 'memmamba' or 'mamba', got {name!r}")
    if name == "memmamba":
        return MemMambaModel(VOCAB, DIGITS, memory=True, **cfg["model"])
    target = n_params(MemMambaModel(VOCAB, DIGITS, memory=True, **cfg["model"]))
    widths = range(cfg["model"]["d_model"], 2 * cfg["model"]["d_model"] + 1, 2)
    sizes = {d: n_params(MemMambaModel(VOCAB, DIGITS, memory=False, **dict(cfg["model"], d_model=d))) for d in widths}
    best = min(sizes, key=lambda d: abs(sizes[d] - target))
    return MemMambaModel(VOCAB, DIGITS, memory=False, **dict(cfg["model"], d_model=best))


def train(model, cfg: dict, device) -> tuple[float, list]:
    """Trains in place; returns (seconds, the loss logged every tenth of the steps)."""
    t = cfg["train"]
    gen = torch.Generator().manual_seed(t["seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=t["lr"], weight_decay=t["weight_decay"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=t["lr"], total_steps=t["steps"], pct_start=0.1)
    model.train()
    start = time.perf_counter()
    log = []
    for step in range(t["steps"]):
        longest = train_length_at(step, cfg)
        length = int(torch.randint(max(4, longest // 4), longest + 1, (1,), generator=gen))
        tokens, labels = passkey_batch(t["batch_size"], length, gen, device)
        loss = F.cross_entropy(model(tokens), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % max(1, t["steps"] // 10) == 0:
            log.append(dict(step=step + 1, longest=longest, loss=round(loss.item(), 4)))
            print(f"  step {step + 1}/{t['steps']} (lengths up to {longest}) loss {loss.item():.3f}", flush=True)
    return time.perf_counter() - start, log


def train_length_at(step: int, cfg: dict) -> int:
    """Longest training length at ``step``: ``train_length`` throughout, or with
    ``train.length_warmup`` = f a curriculum rising linearly from ``task.start_length`` to
    ``train_length`` over the first f of the steps."""
    task, t = cfg["task"], cfg["train"]
    warm = t.get("length_warmup", 0.0) * t["steps"]
    if warm <= 0 or step >= warm:
        return task["train_length"]
    start = task.get("start_length", task["train_length"])
    return int(start + (task["train_length"] - start) * step / warm)


@torch.no_grad()
def evaluate(model, length: int, samples: int, device, batch: int = 64) -> float:
    model.eval()
    gen = torch.Generator().manual_seed(1234 + length)
    correct = 0
    for i in range(0, samples, batch):
        tokens, labels = passkey_batch(min(batch, samples - i), length, gen, device)
        correct += (model(tokens).argmax(-1) == labels).sum().item()
    return correct / samples


def capacity_runs(cfg: dict, state_sizes, device, min_accuracy: float) -> tuple[list, str]:
    """One plain Mamba per d_state, trained by the recipe; (rows, markdown table) with the accuracy per evaluation
    length, the recurrent state's size (numbers per sequence, all layers) and the passkey capacity."""
    rows = []
    lengths = cfg["task"]["eval_lengths"]
    for d_state in state_sizes:
        torch.manual_seed(cfg["train"]["seed"])
        model = MemMambaModel(VOCAB, DIGITS, memory=False, **dict(cfg["model"], d_state=d_state)).to(device)
        state = sum(m.d_inner * m.d_state for m in model.layers)
        print(f"d_state {d_state}: {n_params(model)} parameters, state {state} numbers", flush=True)
        seconds, log = train(model, cfg, device)
        acc = {n: evaluate(model, n, cfg["task"]["eval_samples"], device) for n in lengths}
        rows.append(dict(d_state=d_state, state_numbers=state, params=n_params(model), train_seconds=round(seconds, 1),
                         accuracy=acc, capacity=state_capacity(acc, min_accuracy), loss_log=log))
        print(json.dumps(rows[-1]), flush=True)
    table = "\n".join([f"| d_state | state numbers | " + " | ".join(f"acc @ {n}" for n in lengths) +
                       f" | capacity (acc >= {min_accuracy}) |", "|---|---|" + "---|" * len(lengths) + "---|",
                       *[f"| {r['d_state']} | {r['state_numbers']} | " + " | ".join(f"{100 * r['accuracy'][n]:.1f}" for n in lengths)
                         + f" | {r['capacity']} |" for r in rows]])
    return rows, table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="YAML recipe, e.g. configs/passkey_smoke.yaml")
    p.add_argument("--device", default=None, help="override the recipe's device")
    p.add_argument("--out", default=None, help="JSON file to write")
    p.add_argument("--models", nargs="+", default=None, help="run only these of the recipe's models (e.g. one per process)")
    p.add_argument("--state-sizes", type=int, nargs="+", default=None,
                   help="state capacity instead: a plain Mamba per d_state (see the module docstring)")
    p.add_argument("--capacity-accuracy", type=float, default=0.9)
    args = p.parse_args(argv)
    cfg = yaml.safe_load(Path(args.config).read_text())
    if args.models:
        unknown = sorted(set(args.models) - set(cfg["models"]))
        if unknown:
            p.error(f"--models {unknown} not in the recipe's models {cfg['models']}")
        cfg["models"] = list(args.models)
    device = torch.device(args.device or cfg.get("device", "cpu"))
    command = "PYTHONPATH=. python benchmarks/passkey.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    if args.state_sizes:
        rows, table = capacity_runs(cfg, args.state_sizes, device, args.capacity_accuracy)
        print(table)
        if args.out:
            Path(args.out).write_text(json.dumps(dict(command=command, config=cfg, device=str(device), threads=torch.get_num_threads(),
                                                      torch=torch.__version__, capacity=rows, table=table), indent=1) + "\n")
        return 0
    results = []
    for name in cfg["models"]:
        torch.manual_seed(cfg["train"]["seed"])
        model = build(name, cfg).to(device)
        params = n_params(model)
        print(f"{name}: {params} parameters, width {model.embed.embedding_dim}", flush=True)
        seconds, log = train(model, cfg, device)
        acc = {n: evaluate(model, n, cfg["task"]["eval_samples"], device) for n in cfg["task"]["eval_lengths"]}
        tokens, _ = passkey_batch(8, cfg["task"]["train_length"], torch.Generator().manual_seed(7), device)
        states = model.forward_hidden(tokens)
        layer0 = model.layers[0]
        x0 = model.norms[0](states[0])
        distances = [k for k in (1, 16, 64) if k < tokens.shape[1]]
        run = dict(model=name, params=params, d_model=model.embed.embedding_dim, train_seconds=round(seconds, 1), accuracy=acc,
                   horizontal_fidelity_layer0=horizontal_fidelity(layer0, x0, distances),
                   vertical_fidelity=vertical_fidelity(states), loss_log=log)
        print(json.dumps(run), flush=True)
        results.append(run)
    lengths = cfg["task"]["eval_lengths"]
    table = "\n".join([f"| model | params | width | " + " | ".join(f"acc @ {n}" for n in lengths) + " |",
                       "|---|---|---|" + "---|" * len(lengths),
                       *[f"| {r['model']} | {r['params']} | {r['d_model']} | " + " | ".join(f"{100 * r['accuracy'][n]:.1f}" for n in lengths) + " |"
                         for r in results]])
    print(table)
    if args.out:
        Path(args.out).write_text(json.dumps(dict(
            command="PYTHONPATH=. python benchmarks/passkey.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
            config=cfg, device=str(device), threads=torch.get_num_threads(), torch=torch.__version__,
            results=results, table=table), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
