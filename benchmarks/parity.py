"""Parity of bit strings, trained short and tested long, with and without negative eigenvalues.

The state-tracking task of Grazzi et al., "Unlocking State-Tracking in Linear RNNs Through Negative
Eigenvalues" (ICLR 2025), in their setting (adankow/unlocking_state_tracking, experiments/parity_mamba*_
single_layer.yaml): one Mamba layer of width 16 over tokens {0, 1} (plus padding), the parity of the whole
string predicted at its last token; training strings of 3-40 bits, test strings of 40-256 bits; AdamW,
lr 1e-3 with linear warm-up and cosine decay to 1e-3 of it, batch 256. Their runs take 20,000 steps; the
step count here is a flag and recorded in the results.

`--task modular` is the paper's second task, modular arithmetic without brackets (Deletang et al., "Neural
Networks and the Chomsky Hierarchy", ICLR 2023, task `modular_arithmetic`; the paper uses the xLSTM repository's
generator, adankow/unlocking_state_tracking xlstm/experiments/data/formal_language/tasks/modular_arithmetic.py,
with mod_arithmetic_mamba*.yaml): numbers in 0..4 alternating with operators {+, -, *}, closed by `=`, e.g.
`3 + 4 * 2 - 1 =`; the target is the value of the expression modulo 5 with the usual precedence (* before + and
-, left to right otherwise), one of 5 classes read at the `=` token. Vocabulary 0-4, + - * = and padding (10
tokens, as theirs). Lengths count the string with its answer, as their generator does: 3-40 for training gives
1-19 numbers (3-39 tokens), 40-256 for testing gives 19-127 numbers (39-255 tokens). Their model: 2 Mamba layers
of width 128 (d_state 16, expand 2), AdamW with weight decay 0.1, the same lr schedule, 100,000 steps.

    python benchmarks/parity.py --task modular --mixer mamba --negative both --seeds 0 1 2 --steps 3000 --out m.json
    python benchmarks/parity.py --tabulate benchmarks/results/parity_*.json   # one markdown table
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from zoo.core import RMSNorm, ResidualBlock, add_norm
from zoo.core.mamba import Mamba
from zoo.core.mamba2 import Mamba2

PAD, VOCAB = 2, 3


def batch(gen: torch.Generator, size: int, lo: int, hi: int, device):
    """Bit strings of uniform lengths in [lo, hi], right-padded; (tokens, lengths, parity)."""
    lengths = torch.randint(lo, hi + 1, (size,), generator=gen)
    bits = torch.randint(0, 2, (size, hi), generator=gen)
    valid = torch.arange(hi)[None] < lengths[:, None]
    tokens = torch.where(valid, bits, torch.full_like(bits, PAD))
    parity = (bits * valid).sum(1) % 2
    return tokens.to(device), lengths.to(device), parity.to(device)


MODULUS = 5
PLUS, MINUS, TIMES, EQUALS, MOD_PAD, MOD_VOCAB = 5, 6, 7, 8, 9, 10  # numbers 0..4 are their own tokens
OPERATORS = "+-*"  # token PLUS + i is OPERATORS[i]


def modular_batch(gen: torch.Generator, size: int, lo: int, hi: int, device):
    """Expressions `n0 op1 n1 ... =` over numbers 0..4 and operators + - *, right-padded; (tokens, lengths, value).

    ``lo``/``hi`` bound the length of the whole string with its answer (expression, `=`, value), as in the
    reference generator: the count of numbers is uniform in [(lo + 1) // 2 - 1, (hi + 1) // 2 - 1], the model reads
    the expression and `=` (2 tokens per number), and the value is the expression modulo 5, * before + and -.
    """
    n_lo, n_hi = (lo + 1) // 2 - 1, (hi + 1) // 2 - 1
    if not 1 <= n_lo <= n_hi:
        raise ValueError(f"modular expressions need 3 <= lo <= hi, got lo={lo}, hi={hi}")
    counts = torch.randint(n_lo, n_hi + 1, (size,), generator=gen)
    numbers = torch.randint(0, MODULUS, (size, n_hi), generator=gen)
    ops = torch.randint(0, len(OPERATORS), (size, n_hi), generator=gen)  # ops[:, i] sits after numbers[:, i]
    tokens = torch.stack([numbers, ops + PLUS], dim=2).reshape(size, 2 * n_hi)
    lengths = 2 * counts
    position = torch.arange(2 * n_hi)[None]
    tokens = torch.where(position == lengths[:, None] - 1, EQUALS, tokens)  # the operator after the last number
    tokens = torch.where(position < lengths[:, None], tokens, MOD_PAD)
    # Left to right: `total` holds the finished additive terms, `term` the product being built, `sign` its sign.
    total, term, sign = torch.zeros(size, dtype=torch.long), numbers[:, 0], torch.ones(size, dtype=torch.long)
    for i in range(1, n_hi):
        op, number, live = ops[:, i - 1], numbers[:, i], i < counts
        times = op == OPERATORS.index("*")
        new_total = torch.where(times, total, (total + sign * term) % MODULUS)
        new_term = torch.where(times, term * number % MODULUS, number)
        new_sign = torch.where(times, sign, torch.where(op == OPERATORS.index("-"), -1, 1))
        total = torch.where(live, new_total, total)
        term = torch.where(live, new_term, term)
        sign = torch.where(live, new_sign, sign)
    value = (total + sign * term) % MODULUS
    return tokens.to(device), lengths.to(device), value.to(device)


# Per task: generator, vocabulary, classes and the reference configuration (width, layers, weight decay).
TASKS = {
    "parity": {"batch": batch, "vocab": VOCAB, "classes": 2, "d_model": 16, "depth": 1, "weight_decay": 0.0},
    "modular": {"batch": modular_batch, "vocab": MOD_VOCAB, "classes": MODULUS, "d_model": 128, "depth": 2,
                "weight_decay": 0.1},
}


class ParityModel(nn.Module):
    """Embedding, ``depth`` residual mixer blocks, final norm, a linear head read at each string's last token."""

    def __init__(self, mixer: str, negative: bool, d_model: int = 16, depth: int = 1, vocab: int = VOCAB,
                 classes: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        if mixer == "mamba":
            make = lambda i: Mamba(d_model, d_state=16, layer_idx=i, negative_eigenvalues=negative)  # noqa: E731
        elif mixer == "mamba2":
            make = lambda i: Mamba2(d_model, d_state=16, headdim=8, chunk_size=64, layer_idx=i,  # noqa: E731
                                    negative_eigenvalues=negative)
        else:
            raise ValueError(f"mixer must be 'mamba' or 'mamba2', got {mixer!r}")
        self.blocks = nn.ModuleList(ResidualBlock(d_model, make(i), RMSNorm(d_model)) for i in range(depth))
        self.norm_f = RMSNorm(d_model)
        self.head = nn.Linear(d_model, classes)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        hidden, residual = self.embed(tokens), None
        for block in self.blocks:
            hidden, residual = block(hidden, residual)
        hidden, _ = add_norm(hidden, residual, self.norm_f)
        last = hidden[torch.arange(tokens.shape[0], device=tokens.device), lengths - 1]
        return self.head(last)


@torch.no_grad()
def accuracy(model, gen, lo, hi, device, n=2048, size=256, make_batch=batch):
    model.eval()
    correct = 0
    for _ in range(n // size):
        tokens, lengths, parity = make_batch(gen, size, lo, hi, device)
        correct += (model(tokens, lengths).argmax(-1) == parity).sum().item()
    model.train()
    return correct / (n // size * size)


def run(mixer: str, negative: bool, seed: int, steps: int, device: str, warmup: int, lr: float = 1e-3, bs: int = 256,
        task: str = "parity", d_model: int | None = None, depth: int | None = None, eval_n: int = 2048):
    """Train on lengths 3-40 and test on 40-256 (``eval_n`` fresh strings each); ``d_model``/``depth`` default to the
    task's reference setting."""
    spec = TASKS[task]
    d_model, depth = d_model or spec["d_model"], depth or spec["depth"]
    make_batch = spec["batch"]
    torch.manual_seed(seed)
    model = ParityModel(mixer, negative, d_model, depth, spec["vocab"], spec["classes"]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=spec["weight_decay"])

    def lr_at(step):  # linear warm-up, cosine decay to 1e-3 of the peak (the reference configuration)
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 1e-3 + (1 - 1e-3) * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(1000 + seed)
    start, losses = time.time(), []
    for step in range(steps):
        tokens, lengths, parity = make_batch(gen, bs, 3, 40, device)
        loss = F.cross_entropy(model(tokens, lengths), parity)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            losses.append([step, round(loss.item(), 4)])
    test_gen = torch.Generator().manual_seed(10_000 + seed)
    return {
        "task": task, "mixer": mixer, "negative_eigenvalues": negative, "seed": seed, "steps": steps, "warmup": warmup,
        "batch_size": bs, "lr": lr, "weight_decay": spec["weight_decay"], "d_model": d_model, "depth": depth,
        "params": sum(p.numel() for p in model.parameters()),
        "train_acc_3_40": accuracy(model, test_gen, 3, 40, device, eval_n, min(256, eval_n), make_batch),
        "test_acc_40_256": accuracy(model, test_gen, 40, 256, device, eval_n, min(256, eval_n), make_batch),
        "train_seconds": round(time.time() - start, 1), "loss_log": losses,
    }


def tabulate(paths):
    rows = [r for p in paths for r in json.loads(Path(p).read_text())["runs"]]
    groups = {}
    for r in rows:  # results written before --task existed are parity runs
        groups.setdefault((r.get("task", "parity"), r["mixer"], r["negative_eigenvalues"], r["steps"]), []).append(r)
    lines = ["| task | mixer | transitions | steps | seeds | train acc, lengths 3-40 | test acc, lengths 40-256 (each seed) |",
             "|---|---|---|---|---|---|---|"]
    for (task, mixer, neg, steps), rs in sorted(groups.items()):
        mean = lambda k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
        each = ", ".join(f"{r['test_acc_40_256']:.3f}" for r in sorted(rs, key=lambda r: r["seed"]))
        lines.append(f"| {task} | {mixer} | {'(-1, 1)' if neg else '(0, 1)'} | {steps} | {len(rs)} "
                     f"| {mean('train_acc_3_40'):.3f} | {mean('test_acc_40_256'):.3f} ({each}) |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=list(TASKS), default="parity")
    parser.add_argument("--mixer", choices=["mamba", "mamba2"], default="mamba2")
    parser.add_argument("--negative", choices=["on", "off", "both"], default="both")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: a tenth of --steps)")
    parser.add_argument("--d-model", type=int, default=None, help="width (default: the task's, 16 / 128)")
    parser.add_argument("--depth", type=int, default=None, help="mixer layers (default: the task's, 1 / 2)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--tabulate", nargs="+", metavar="JSON")
    args = parser.parse_args()
    if args.tabulate:
        print(tabulate(args.tabulate))
        return
    if args.steps < 1 or (args.warmup is not None and not 0 <= args.warmup <= args.steps):
        parser.error(f"--steps must be >= 1 and --warmup in [0, steps], got {args.steps} and {args.warmup}")
    if (args.d_model is not None and args.d_model < 1) or (args.depth is not None and args.depth < 1):
        parser.error(f"--d-model and --depth must be >= 1, got {args.d_model} and {args.depth}")
    warmup = args.steps // 10 if args.warmup is None else args.warmup
    negatives = {"on": [True], "off": [False], "both": [False, True]}[args.negative]
    runs = []
    for negative in negatives:
        for seed in args.seeds:
            r = run(args.mixer, negative, seed, args.steps, args.device, warmup, task=args.task,
                    d_model=args.d_model, depth=args.depth)
            print(json.dumps({k: v for k, v in r.items() if k != "loss_log"}), flush=True)
            runs.append(r)
    result = {"command": "python benchmarks/parity.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items() if v is not None and k not in ("tabulate",)), "device": args.device,
        "torch": torch.__version__, "runs": runs}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
