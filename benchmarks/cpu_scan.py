"""CPU timing of the chunked selective scan against the sequential loop (the oracle).

    python benchmarks/cpu_scan.py [--threads 2] [--out benchmarks/results/cpu_scan.json]

Median of --repeats runs, forward and forward+backward, at length 1024 and a Vim-S-like shape.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from zoo.core.selective_scan import selective_scan_chunked, selective_scan_naive

SHAPES = [  # (batch, length, dim, d_state)
    (1, 1024, 64, 16),
    (2, 1024, 256, 16),
    (4, 1024, 384, 16),
    (8, 1024, 768, 16),
    (8, 197, 768, 16),
]


def inputs(b, l, d, n, grad):
    g = torch.Generator().manual_seed(0)
    t = [torch.randn(b, l, d, generator=g), torch.randn(b, l, d, generator=g) * 0.5, -torch.rand(d, n, generator=g) - 0.1,
         torch.randn(b, l, n, generator=g), torch.randn(b, l, n, generator=g), torch.randn(d, generator=g),
         torch.randn(b, l, d, generator=g), torch.randn(d, generator=g)]
    if grad:
        for i in (0, 1, 3, 4, 6):
            t[i].requires_grad_(True)
    return t


def bench(fn, b, l, d, n, backward, repeats):
    times = []
    for _ in range(repeats + 1):  # first run warms up
        u, dl, A, B, C, D, z, db = inputs(b, l, d, n, backward)
        t0 = time.perf_counter()
        out = fn(u, dl, A, B, C, D, z, db, True)
        if backward:
            out.sum().backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for shape in SHAPES:
        for backward in (False, True):
            seq = bench(selective_scan_naive, *shape, backward, args.repeats)
            chk = bench(selective_scan_chunked, *shape, backward, args.repeats)
            rows.append(dict(shape=list(shape), mode="fwd+bwd" if backward else "fwd", sequential_ms=seq * 1e3,
                             chunked_ms=chk * 1e3, speedup=seq / chk))
            r = rows[-1]
            print(f"{str(tuple(shape)):22s} {r['mode']:8s} sequential {r['sequential_ms']:9.1f} ms  "
                  f"chunked {r['chunked_ms']:9.1f} ms  x{r['speedup']:.1f}", flush=True)
    if args.out:
        meta = dict(command="python benchmarks/cpu_scan.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v is not None),
                    torch=torch.__version__, threads=args.threads, processor=platform.processor() or platform.machine(),
                    cpu_count=torch.get_num_threads())
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
