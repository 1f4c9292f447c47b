"""Vim with its official BiMamba mixer beside BiMamba2 and Hydra: parameters, speed, and the digits accuracy.

    # speed: one process, the mixers in turn (interleaved rounds), a training step and inference at one size
    PYTHONPATH=. python benchmarks/mixers.py speed --device cuda --img-size 224 --batch 64 --out speed.json
    # accuracy: `zoo finetune` runs with --model-kwargs mixer=..., then one table of their result.json files
    zoo finetune --device cuda --seed 0 --model-kwargs mixer=hydra --output runs/hydra_s0 --no-progress
    PYTHONPATH=. python benchmarks/mixers.py table --speed speed.json --runs runs/*/result.json

Results: benchmarks/results/mixers.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import zoo

MIXERS = ("bimamba", "bimamba2", "hydra")


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def speed(device: str, img_size: int, batch: int, rounds: int, steps: int) -> dict:
    models = {m: zoo.create_model("vim_tiny", img_size=img_size, mixer=m).to(device) for m in MIXERS}
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    opts = {m: torch.optim.AdamW(model.parameters(), lr=1e-4) for m, model in models.items()}
    times = {m: {"train": [], "infer": []} for m in MIXERS}
    amp = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda")
    for r in range(rounds + 1):  # round 0 warms up (kernel compilation, caches)
        for m, model in models.items():
            _sync(device)
            t = time.perf_counter()
            for _ in range(steps):
                with amp:
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                opts[m].zero_grad(set_to_none=True)
                loss.backward()
                opts[m].step()
            _sync(device)
            train = time.perf_counter() - t
            t = time.perf_counter()
            with torch.no_grad(), amp:
                for _ in range(steps):
                    model(x)
            _sync(device)
            if r:
                times[m]["train"].append(steps * batch / train)
                times[m]["infer"].append(steps * batch / (time.perf_counter() - t))
    return {
        "device": torch.cuda.get_device_name() if torch.device(device).type == "cuda" else "cpu",
        "img_size": img_size, "batch": batch, "rounds": rounds, "steps_per_round": steps,
        "autocast": "bf16" if torch.device(device).type == "cuda" else None, "torch": torch.__version__,
        "rows": [{"mixer": m, "params": sum(p.numel() for p in models[m].parameters()),
                  "train_images_per_s": statistics.median(times[m]["train"]),
                  "infer_images_per_s": statistics.median(times[m]["infer"])} for m in MIXERS],
    }


def table(speed_json: dict | None, runs: list) -> str:
    acc = {}
    results = []
    for path in runs:  # result.json files of zoo finetune, or a file that collects them under "runs"
        data = json.loads(Path(path).read_text())
        results += data["runs"] if "runs" in data else [data]
    for r in results:
        acc.setdefault(r["model_kwargs"].get("mixer", "bimamba"), []).append(
            (r["config"]["seed"], r["accuracy"], r["params"], r["train_images_per_s"], r["eval_images_per_s"], r["device"]))
    head = "| mixer | params (digits model) | digits top-1, mean (each seed) | job train / eval img/s (device) |"
    sep = "|---|---|---|---|"
    if speed_json:
        s = speed_json
        head += f" train img/s ({s['img_size']} px, batch {s['batch']}) | inference img/s | params (vim_tiny) |"
        sep += "---|---|---|"
        by = {row["mixer"]: row for row in s["rows"]}
    lines = [head, sep]
    for m in MIXERS:
        rs = sorted(acc.get(m, []))
        if rs:
            cell = f"{statistics.mean(r[1] for r in rs):.4f} ({', '.join(f'{r[1]:.4f}' for r in rs)})"
            rate = f"{statistics.median(r[3] for r in rs):.0f} / {statistics.median(r[4] for r in rs):.0f} ({rs[0][5]})"
            line = f"| {m} | {rs[0][2]:,} | {cell} | {rate} |"
        else:
            line = f"| {m} | - | not run | - |"
        if speed_json:
            row = by[m]
            line += f" {row['train_images_per_s']:.0f} | {row['infer_images_per_s']:.0f} | {row['params']:,} |"
        lines.append(line)
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    s.add_argument("--img-size", type=int, default=224)
    s.add_argument("--batch", type=int, default=64)
    s.add_argument("--rounds", type=int, default=5)
    s.add_argument("--steps", type=int, default=10)
    s.add_argument("--out", type=Path)
    t = sub.add_parser("table")
    t.add_argument("--speed", type=Path)
    t.add_argument("--runs", nargs="+", default=[])
    args = parser.parse_args()
    if args.cmd == "speed":
        result = speed(args.device, args.img_size, args.batch, args.rounds, args.steps)
        result["command"] = (f"python benchmarks/mixers.py speed --device {args.device} --img-size {args.img_size} "
                             f"--batch {args.batch} --rounds {args.rounds} --steps {args.steps}")
        print(json.dumps(result, indent=1))
        if args.out:
            args.out.write_text(json.dumps(result, indent=1) + "\n")
    else:
        print(table(json.loads(args.speed.read_text()) if args.speed else None, args.runs))


if __name__ == "__main__":
    main()
