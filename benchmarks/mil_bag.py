"""Bags of any size on the GPU: forward + backward time and peak memory of MambaMIL (and the
baselines) on one bag of 100,000 instances x 1024 features, and on the same instances split into
several bags packed into one sequence.

    python benchmarks/mil_bag.py --output benchmarks/results/mil_bag_h100.json

Timing: CUDA events around ``repeats`` forward+backward passes after ``warmup`` passes; peak
memory is ``torch.cuda.max_memory_allocated`` during one pass, minus what was allocated before it
(weights and the input bag). ``--device cpu --instances 2000`` is a quick smoke run.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from zoo.models.mil import ABMIL, MambaMIL, TransMIL

MODELS = {
    "mambamil": lambda d, r: MambaMIL(in_dim=d, num_classes=2, rate=r, drop_rate=0),
    "mambamil_mamba": lambda d, r: MambaMIL(in_dim=d, num_classes=2, mixer="mamba", drop_rate=0),
    "abmil": lambda d, r: ABMIL(in_dim=d, num_classes=2, drop_rate=0),
    "transmil": lambda d, r: TransMIL(in_dim=d, num_classes=2, drop_rate=0),
}


def measure(model, bags, cu, device, dtype, warmup, repeats):
    cuda = device.type == "cuda"

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(bags, cu_seqlens=cu)
        logits.float().sum().backward()
        model.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            step()
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / repeats
    else:
        peak = None
        t0 = time.perf_counter()
        for _ in range(repeats):
            step()
        ms = (time.perf_counter() - t0) * 1e3 / repeats
    return ms, peak


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--instances", type=int, default=100_000)
    p.add_argument("--in-dim", type=int, default=1024)
    p.add_argument("--bags", type=int, nargs="+", default=[1, 8], help="split the instances into this many packed bags")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--rate", type=int, default=10)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="autocast dtype")
    p.add_argument("--device", default="cuda")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute MambaMIL layers in backward")
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    x = torch.randn(args.instances, args.in_dim, device=device)
    rows = []
    for name in args.models:
        model = MODELS[name](args.in_dim, args.rate).to(device).train()
        if args.grad_checkpointing and hasattr(model, "set_grad_checkpointing"):
            model.set_grad_checkpointing()
        for num_bags in args.bags:
            # Unequal bags: sizes proportional to 1, 2, ..., num_bags.
            weights = torch.arange(1, num_bags + 1, dtype=torch.float64)
            sizes = (weights / weights.sum() * args.instances).long()
            sizes[-1] += args.instances - int(sizes.sum())
            cu = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)]).to(device)
            row = dict(model=name, instances=args.instances, in_dim=args.in_dim, bags=num_bags, dtype=args.dtype)
            try:
                ms, peak = measure(model, x, cu, device, dtype, args.warmup, args.repeats)
                row.update(fwd_bwd_ms=round(ms, 2), peak_mem_gib=None if peak is None else round(peak / 2**30, 3))
            except torch.OutOfMemoryError:
                row.update(fwd_bwd_ms=None, peak_mem_gib="OOM")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(row, flush=True)
            rows.append(row)
        del model
    result = dict(
        command="PYTHONPATH=. python benchmarks/mil_bag.py " + shlex.join(sys.argv[1:] if argv is None else argv), device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch=torch.__version__, params={n: sum(p.numel() for p in MODELS[n](args.in_dim, args.rate).parameters()) for n in args.models},
        config=vars(args), rows=rows,
    )
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
