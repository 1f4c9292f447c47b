"""CPU timing of the selective-scan paths: the chunked PyTorch path (the CPU default before the fused scan)
against the fused numba scan (impl="cpu"), optionally the sequential loop (impl="naive"); the same for Mamba-2's
SSD scan (``zoo.core.ssd.ssd_scan``: chunked state-space-duality form against its fused numba scan).

    python benchmarks/cpu_scan.py [--threads 1 2] [--rounds 5] [--ops mamba1 ssd] [--train-steps 20] [--out benchmarks/results/cpu_scan.json]

Every feature of a Vim / Mamba block is on (D, z gate, delta_bias + softplus, float32); for the SSD scan every
feature of a Mamba-2 mixer without its norm gate (D per head, z gate, dt_bias + softplus, one group of B and C). The machine may be
shared, so the paths run in interleaved rounds in one process (chunked, fused, chunked, fused, ...), each
round on the same inputs; reported: the median time of each path and the median of the per-round ratios.
With --train-steps, also the README's main job (``zoo finetune``'s default model, batch 64, AdamW, random
32x32 images): training images/s with impl="auto" as a user without numba gets it (chunked) and with it
(fused), the same number of steps per round.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

from zoo.core.selective_scan import selective_scan
from zoo.core.ssd import ssd_scan

SHAPES = [  # (batch, length, dim, d_state): issue 19's main-job block, length 1024, length 4096
    (64, 17, 384, 16),
    (2, 1024, 768, 16),
    (1, 4096, 1536, 16),
]


SSD_SHAPES = [  # (batch, length, nheads, headdim, d_state): the same widths (nheads x 64 = 384, 768, 1536) with
    (64, 17, 6, 64, 128),  # Mamba-2's defaults (headdim 64, d_state 128)
    (2, 1024, 12, 64, 128),
    (1, 4096, 24, 64, 128),
]


def ssd_inputs(b, l, h, p, n):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    t = [r(b, l, h, p), r(b, l, h) * 0.5, -torch.rand(h, generator=g) - 0.1, r(b, l, 1, n), r(b, l, 1, n), r(h),
         r(b, l, h, p), r(h)]
    return [x.requires_grad_(True) for x in t]


def ssd_timed(impl, args, backward):
    x, dt, A, B, C, D, z, dt_bias = args
    t0 = time.perf_counter()
    if backward:
        out = ssd_scan(x, dt, A, B, C, D, z, dt_bias, dt_softplus=True, impl=impl)
        torch.autograd.grad(out.sum(), args)
    else:
        with torch.no_grad():
            ssd_scan(x, dt, A, B, C, D, z, dt_bias, dt_softplus=True, impl=impl)
    return time.perf_counter() - t0


def inputs(b, l, d, n):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    t = [r(b, l, d), r(b, l, d) * 0.5, -torch.rand(d, n, generator=g) - 0.1, r(b, l, n), r(b, l, n), r(d), r(b, l, d), r(d)]
    return [x.requires_grad_(True) for x in t]


def timed(impl, args, backward):
    t0 = time.perf_counter()
    if backward:
        out = selective_scan(*args, True, impl=impl)
        torch.autograd.grad(out.sum(), args)
    else:
        with torch.no_grad():
            selective_scan(*args, True, impl=impl)
    return time.perf_counter() - t0


def train_rounds(steps, rounds):
    """Images/s of the main job's training step, chunked vs fused scan, interleaved rounds of ``steps`` steps."""
    import zoo
    from zoo.core.selective_scan import cpu_fused
    from zoo.tasks.classification import FinetuneConfig, model_kwargs_for

    cfg = FinetuneConfig()
    torch.manual_seed(0)
    model = zoo.create_model(cfg.model, **model_kwargs_for(cfg, 10)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    x, y = torch.randn(cfg.batch_size, 3, cfg.img_size, cfg.img_size), torch.randint(0, 10, (cfg.batch_size,))
    numba_module = cpu_fused.numba

    def run(fused):
        cpu_fused.numba = numba_module if fused else None  # without numba, impl="auto" takes the chunked path
        try:
            t0 = time.perf_counter()
            for _ in range(steps):
                loss = torch.nn.functional.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            return steps * cfg.batch_size / (time.perf_counter() - t0)
        finally:
            cpu_fused.numba = numba_module

    run(False), run(True)  # warm-up
    ips = {"chunked": [], "cpu": []}
    for _ in range(rounds):
        ips["chunked"].append(run(False))
        ips["cpu"].append(run(True))
    return dict(images_per_s={k: statistics.median(v) for k, v in ips.items()},
                speedup=statistics.median(b / a for a, b in zip(ips["chunked"], ips["cpu"])))


def _numba_version():
    try:
        import numba
    except ImportError:
        return None
    return numba.__version__


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--impls", nargs="+", default=["chunked", "cpu"], help="first one is the baseline of the ratios")
    ap.add_argument("--shapes", nargs="+", default=None, help="batch,length,dim,d_state (default: the issue's three)")
    ap.add_argument("--ops", nargs="+", default=["mamba1", "ssd"], choices=["mamba1", "ssd"],
                    help="mamba1: selective_scan at --shapes; ssd: ssd_scan at --ssd-shapes")
    ap.add_argument("--ssd-shapes", nargs="+", default=None,
                    help="batch,length,nheads,headdim,d_state (default: SSD_SHAPES)")
    ap.add_argument("--note", default=None, help="recorded in the JSON's meta (e.g. the machine's load)")
    ap.add_argument("--train-steps", type=int, default=0, help="also time the main job's training (steps per round)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []

    def save():  # after every row, so that an interrupted run keeps what it measured
        if not args.out:
            return
        meta = dict(command="python " + " ".join(sys.argv), torch=torch.__version__, numba=_numba_version(),
                    processor=platform.processor() or platform.machine(), logical_cpus=os.cpu_count(),
                    baseline=args.impls[0], rounds=args.rounds, note=args.note)
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)

    for threads in args.threads:
        torch.set_num_threads(threads)
        parse = lambda given: [tuple(map(int, s.split(","))) for s in given]  # noqa: E731
        cases = []
        if "mamba1" in args.ops:
            cases += [("selective_scan", s, inputs, timed) for s in (parse(args.shapes) if args.shapes else SHAPES)]
        if "ssd" in args.ops:
            cases += [("ssd", s, ssd_inputs, ssd_timed) for s in (parse(args.ssd_shapes) if args.ssd_shapes else SSD_SHAPES)]
        for op, shape, make, run in cases:
            x = make(*shape)
            for backward in (False, True):
                for impl in args.impls:  # warm-up (and numba's compile or cache load)
                    run(impl, x, backward)
                times = {impl: [] for impl in args.impls}
                for _ in range(args.rounds):
                    for impl in args.impls:
                        times[impl].append(run(impl, x, backward))
                base = args.impls[0]
                row = dict(threads=threads, op=op, shape=list(shape), mode="fwd+bwd" if backward else "fwd",
                           ms={k: statistics.median(v) * 1e3 for k, v in times.items()},
                           speedup_vs_baseline={k: statistics.median(b / t for b, t in zip(times[base], v))
                                                for k, v in times.items() if k != base})
                rows.append(row)
                print(f"threads {threads}  {op:14s} {str(tuple(shape)):24s} {row['mode']:8s} "
                      + "  ".join(f"{k} {v:9.1f} ms" for k, v in row["ms"].items()) + "  "
                      + "  ".join(f"{k} x{v:.1f}" for k, v in row["speedup_vs_baseline"].items()), flush=True)
                save()
        if args.train_steps:
            row = dict(threads=threads, mode="train main job", batch=64, steps_per_round=args.train_steps,
                       **train_rounds(args.train_steps, args.rounds))
            rows.append(row)
            print(f"threads {threads}  main job training: "
                  + "  ".join(f"{k} {v:.1f} images/s" for k, v in row["images_per_s"].items())
                  + f"  x{row['speedup']:.2f}", flush=True)
            save()


if __name__ == "__main__":
    main()
