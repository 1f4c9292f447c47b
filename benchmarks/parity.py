"""Parity of bit strings, trained short and tested long, with and without negative eigenvalues.

The state-tracking task of Grazzi et al., "Unlocking State-Tracking in Linear RNNs Through Negative
Eigenvalues" (ICLR 2025), in their setting (adankow/unlocking_state_tracking, experiments/parity_mamba*_
single_layer.yaml): one Mamba layer of width 16 over tokens {0, 1} (plus padding), the parity of the whole
string predicted at its last token; training strings of 3-40 bits, test strings of 40-256 bits; AdamW,
lr 1e-3 with linear warm-up and cosine decay to 1e-3 of it, batch 256. Their runs take 20,000 steps; the
step count here is a flag and recorded in the results.

    python benchmarks/parity.py --mixer mamba2 --negative both --seeds 0 1 2 --steps 3000 --out results.json
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


class ParityModel(nn.Module):
    def __init__(self, mixer: str, negative: bool, d_model: int = 16, depth: int = 1):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d_model)
        if mixer == "mamba":
            make = lambda i: Mamba(d_model, d_state=16, layer_idx=i, negative_eigenvalues=negative)  # noqa: E731
        elif mixer == "mamba2":
            make = lambda i: Mamba2(d_model, d_state=16, headdim=8, chunk_size=64, layer_idx=i,  # noqa: E731
                                    negative_eigenvalues=negative)
        else:
            raise ValueError(f"mixer must be 'mamba' or 'mamba2', got {mixer!r}")
        self.blocks = nn.ModuleList(ResidualBlock(d_model, make(i), RMSNorm(d_model)) for i in range(depth))
        self.norm_f = RMSNorm(d_model)
        self.head = nn.Linear(d_model, 2)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        hidden, residual = self.embed(tokens), None
        for block in self.blocks:
            hidden, residual = block(hidden, residual)
        hidden, _ = add_norm(hidden, residual, self.norm_f)
        last = hidden[torch.arange(tokens.shape[0], device=tokens.device), lengths - 1]
        return self.head(last)


@torch.no_grad()
def accuracy(model, gen, lo, hi, device, n=2048, size=256):
    model.eval()
    correct = 0
    for _ in range(n // size):
        tokens, lengths, parity = batch(gen, size, lo, hi, device)
        correct += (model(tokens, lengths).argmax(-1) == parity).sum().item()
    model.train()
    return correct / (n // size * size)


def run(mixer: str, negative: bool, seed: int, steps: int, device: str, warmup: int, lr: float = 1e-3, bs: int = 256):
    torch.manual_seed(seed)
    model = ParityModel(mixer, negative).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

    def lr_at(step):  # linear warm-up, cosine decay to 1e-3 of the peak (the reference configuration)
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 1e-3 + (1 - 1e-3) * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(1000 + seed)
    start, losses = time.time(), []
    for step in range(steps):
        tokens, lengths, parity = batch(gen, bs, 3, 40, device)
        loss = F.cross_entropy(model(tokens, lengths), parity)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            losses.append([step, round(loss.item(), 4)])
    test_gen = torch.Generator().manual_seed(10_000 + seed)
    return {
        "mixer": mixer, "negative_eigenvalues": negative, "seed": seed, "steps": steps, "warmup": warmup,
        "batch_size": bs, "lr": lr, "params": sum(p.numel() for p in model.parameters()),
        "train_acc_3_40": accuracy(model, test_gen, 3, 40, device),
        "test_acc_40_256": accuracy(model, test_gen, 40, 256, device),
        "train_seconds": round(time.time() - start, 1), "loss_log": losses,
    }


def tabulate(paths):
    rows = [r for p in paths for r in json.loads(Path(p).read_text())["runs"]]
    groups = {}
    for r in rows:
        groups.setdefault((r["mixer"], r["negative_eigenvalues"], r["steps"]), []).append(r)
    lines = ["| mixer | transitions | steps | seeds | train acc, 3-40 bits | test acc, 40-256 bits (each seed) |",
             "|---|---|---|---|---|---|"]
    for (mixer, neg, steps), rs in sorted(groups.items()):
        mean = lambda k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
        each = ", ".join(f"{r['test_acc_40_256']:.3f}" for r in sorted(rs, key=lambda r: r["seed"]))
        lines.append(f"| {mixer} | {'(-1, 1)' if neg else '(0, 1)'} | {steps} | {len(rs)} | {mean('train_acc_3_40'):.3f} "
                     f"| {mean('test_acc_40_256'):.3f} ({each}) |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mixer", choices=["mamba", "mamba2"], default="mamba2")
    parser.add_argument("--negative", choices=["on", "off", "both"], default="both")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: a tenth of --steps)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--tabulate", nargs="+", metavar="JSON")
    args = parser.parse_args()
    if args.tabulate:
        print(tabulate(args.tabulate))
        return
    if args.steps < 1 or (args.warmup is not None and not 0 <= args.warmup <= args.steps):
        parser.error(f"--steps must be >= 1 and --warmup in [0, steps], got {args.steps} and {args.warmup}")
    warmup = args.steps // 10 if args.warmup is None else args.warmup
    negatives = {"on": [True], "off": [False], "both": [False, True]}[args.negative]
    runs = []
    for negative in negatives:
        for seed in args.seeds:
            r = run(args.mixer, negative, seed, args.steps, args.device, warmup)
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
