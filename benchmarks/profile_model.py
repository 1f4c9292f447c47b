"""Where a zoo model's inference time goes: host (Python, dispatcher, launchers) vs GPU kernels.

    python benchmarks/profile_model.py vim_small --size 224 --batch 64 [--out DIR]

Runs ``reps`` inference steps (bf16 autocast, eval, inference_mode) under ``torch.profiler`` after a
warm-up and prints the ops with the most host time (self CPU) and the kernels with the most GPU time, with
the wall time per step; writes both tables as JSON when ``--out`` is given.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import zoo  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    kwargs = dict(img_size=args.size) if args.model.startswith("vim_") else {}
    model = zoo.create_model(args.model, **kwargs).cuda().eval()
    x = torch.randn(args.batch, 3, args.size, args.size, device="cuda")

    def step():
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(x)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.reps):
            step()
        torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) * 1e3 / args.reps
    events = prof.key_averages()
    host = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[: args.top]
    gpu = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[: args.top]
    rows = lambda evs, key: [dict(name=e.key, calls_per_step=e.count / args.reps,  # noqa: E731
                                  ms_per_step=getattr(e, key) / 1e3 / args.reps) for e in evs]
    report = dict(command="python benchmarks/profile_model.py " + shlex.join(sys.argv[1:] if argv is None else argv),
                  device=torch.cuda.get_device_name(), torch=torch.__version__, wall_ms_per_step_profiled=wall_ms,
                  # A Triton kernel launched inside a Python custom op is counted under the op and as
                  # itself, so this sum can exceed the GPU's busy time (CUDA-graph replay gives that).
                  device_self_ms_summed_per_step=sum(e.self_device_time_total for e in events) / 1e3 / args.reps,
                  host_self_ms_per_step=sum(e.self_cpu_time_total for e in events) / 1e3 / args.reps,
                  top_host=rows(host, "self_cpu_time_total"), top_gpu=rows(gpu, "self_device_time_total"))
    print(f"{args.model} {args.size}px x{args.batch}: {wall_ms:.2f} ms/step under the profiler; "
          f"device self time summed {report['device_self_ms_summed_per_step']:.2f} ms, host self time {report['host_self_ms_per_step']:.2f} ms")
    for title, key in (("host (self CPU)", "top_host"), ("GPU", "top_gpu")):
        print(f"\n{title}: ms/step  calls/step  name")
        for r in report[key]:
            print(f"  {r['ms_per_step']:8.3f}  {r['calls_per_step']:7.1f}  {r['name'][:100]}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"profile_{args.model}_{args.size}.json").write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
