"""Time and peak memory of the torch grouping ops on one large cloud (default 100k points).

    python -m benchmarks.point_ops --device cuda --points 100000 --output benchmarks/results/points_ops_h100.json
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from zoo.models.point.ops import farthest_point_sample, knn
from zoo.models.point.serialization import serialize


def _measure(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    secs = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return out, round(secs, 3), (round(peak, 3) if peak is not None else None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", type=int, default=100_000)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--samples", type=int, default=1024)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    xyz = torch.rand(1, args.points, 3, device=device)
    _measure(lambda: knn(xyz[:, :1000], xyz[:, :1000], args.k), device)  # warm-up (kernels, allocator)
    rows = []
    (_, idx), secs, peak = _measure(lambda: knn(xyz, xyz, args.k), device)
    assert torch.equal(idx[0, :, 0].cpu(), torch.arange(args.points)), "every point must be its own nearest neighbour"
    rows.append({"op": f"knn all {args.points} points, k={args.k}", "seconds": secs, "peak_gib": peak})
    _, secs, peak = _measure(lambda: farthest_point_sample(xyz, args.samples), device)
    rows.append({"op": f"farthest_point_sample {args.points} -> {args.samples}", "seconds": secs, "peak_gib": peak})
    _, secs, peak = _measure(lambda: serialize(xyz, "hilbert", grid_size=0.001), device)
    rows.append({"op": f"serialize hilbert {args.points} points, grid 0.001", "seconds": secs, "peak_gib": peak})
    result = {
        "command": "python -m benchmarks.point_ops " + shlex.join(sys.argv[1:] if argv is None else argv),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "rows": rows,
    }
    print(json.dumps(result, indent=2))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
