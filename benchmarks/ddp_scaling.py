"""Data-parallel scaling of zoo fine-tuning: training images/s of a zoo entry on 1 GPU and on N GPUs (torchrun,
DDP), at a fixed batch per GPU, and the scaling efficiency  images/s(N) / (N x images/s(1)).

    PYTHONPATH=. python benchmarks/ddp_scaling.py                 # vim_small, 224x224, bf16, 64 per GPU, all GPUs
    PYTHONPATH=. python benchmarks/ddp_scaling.py --device cpu --processes 2 --model vim_tiny --img-size 32 \\
        --batch-per-gpu 4 --warmup 1 --steps 2 --model-kwargs depth=1 embed_dim=32 patch_size=8 stride=8 --out /tmp/s.json

The script launches itself twice through ``python -m torch.distributed.run --standalone`` (1 process, then N),
one process per GPU. Each process runs the training step of ``zoo finetune`` (the same engine:
``zoo.tasks.engine.wrap_model`` / ``create_optimizer`` / ``backward_and_step``: forward under autocast,
cross-entropy, backward, gradient-norm clipping, AdamW) on **synthetic data**: one random batch made on the
device up front, so no data loading is timed; what scales is compute plus the gradient all-reduce. ``warmup``
untimed steps (Triton compilation, NCCL set-up), then ``steps`` timed steps between two device synchronisations
and barriers; images/s = N x batch x steps / the slowest rank's time. The JSON (``--out``) holds both runs, the
speed-up, the efficiency, the exact commands and the devices; ``--device cpu`` (gloo) checks the logic without
a GPU at a tiny size. The launched processes get NCCL_NVLS_ENABLE=0 (and PyTorch's / NVSHMEM's multicast off)
unless the environment sets them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="vim_small", help="zoo entry")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--batch-per-gpu", type=int, default=64, help="images per process and step (fixed: weak scaling)")
    p.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "none"], help="autocast dtype")
    p.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"])
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps per run")
    p.add_argument("--steps", type=int, default=30, help="timed steps per run")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: gloo, to check the logic without a GPU")
    p.add_argument("--processes", type=int, default=None, help="processes of the scaled run (default: every visible GPU; 2 on cpu)")
    p.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE", help="more create_model arguments")
    p.add_argument("--timeout", type=float, default=200.0, help="seconds allowed per torchrun launch")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ddp_scaling.json"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run as a torchrun worker, write here
    return p.parse_args(argv)


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    import zoo
    from zoo.tasks.classification import parse_model_kwargs
    from zoo.tasks.engine import (autocast, backward_and_step, cleanup_distributed, create_grad_scaler, create_optimizer,
                                  init_distributed, unwrap_model, wrap_model)

    ctx = init_distributed(args.device)
    device = ctx.device
    amp = None if args.amp == "none" else args.amp
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = zoo.create_model(args.model, num_classes=args.num_classes, img_size=args.img_size, **parse_model_kwargs(args.model_kwargs))
    model.to(device).train()
    params = sum(p.numel() for p in model.parameters())
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model = wrap_model(model, ctx, args.strategy)
    optimizer = create_optimizer(unwrap_model(model), lr=1e-4, weight_decay=0.05)
    scaler = create_grad_scaler(amp, device, args.strategy, ctx.distributed)
    torch.manual_seed(1 + ctx.rank)
    x = torch.randn(args.batch_per_gpu, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(0, args.num_classes, (args.batch_per_gpu,), device=device)

    def step():
        with autocast(device, amp):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        backward_and_step(loss, model, optimizer, clip_grad=1.0, scaler=scaler)
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if ctx.distributed:
            dist.barrier()

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        loss = step()
    sync()
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    elapsed = time.perf_counter() - t0
    slowest = elapsed
    if ctx.distributed:
        t = torch.tensor([elapsed], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        slowest = t.item()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    if ctx.is_main:
        images = ctx.world_size * args.batch_per_gpu * args.steps
        Path(args.worker).write_text(json.dumps(dict(
            nproc=ctx.world_size, images_per_s=images / slowest, step_ms=1000 * slowest / args.steps, timed_images=images,
            timed_seconds=slowest, warmup_seconds=warmup_s, peak_memory_gib_rank0=peak, params=params,
            final_loss=float(loss.item()),
            device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        )))
    cleanup_distributed(ctx)


def launch(args, argv, nproc: int, result_file: str):
    """Run this script under torchrun with ``nproc`` processes; returns (command, result dict)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(Path(__file__).resolve()), *argv, "--worker", result_file]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    # NVLink multicast stays off (shared GPU hosts can be put out of service by it); DDP does not need it.
    for var, value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
        env.setdefault(var, value)
    print(f"[ddp_scaling] {nproc} process(es): {shlex.join(cmd)}", flush=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"ddp_scaling: the {nproc}-process run did not finish within --timeout {args.timeout:.0f} s")
    if proc.returncode != 0:
        raise SystemExit(f"ddp_scaling: the {nproc}-process run failed with exit code {proc.returncode} (its output is above)")
    result = json.loads(Path(result_file).read_text())
    result["launch_seconds"] = time.perf_counter() - start
    return cmd, result


def scaling_summary(single: dict, multi: dict) -> dict:
    """Speed-up and efficiency of the N-process run over the 1-process run (images/s)."""
    n = multi["nproc"]
    speedup = multi["images_per_s"] / single["images_per_s"]
    return {"nproc": n, "speedup": speedup, "efficiency": speedup / n}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    import torch

    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("ddp_scaling: --device cuda but torch.cuda.is_available() is False (use --device cpu to check the logic)")
        visible = torch.cuda.device_count()
        nproc = args.processes or visible
        if nproc > visible:
            raise SystemExit(f"ddp_scaling: --processes {nproc} needs {nproc} GPUs, {visible} are visible")
    else:
        nproc = args.processes or 2
    if nproc < 2:
        raise SystemExit(f"ddp_scaling: the scaled run needs at least 2 processes, got {nproc} (one GPU visible?)")
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cmd1, single = launch(args, argv, 1, os.path.join(tmp, "n1.json"))
        cmdn, multi = launch(args, argv, nproc, os.path.join(tmp, f"n{nproc}.json"))
    summary = scaling_summary(single, multi)
    report = dict(
        benchmark="ddp_scaling", model=args.model, img_size=args.img_size, num_classes=args.num_classes,
        batch_per_gpu=args.batch_per_gpu, amp=args.amp, strategy=args.strategy, grad_checkpointing=args.grad_checkpointing,
        model_kwargs=args.model_kwargs, warmup_steps=args.warmup, timed_steps=args.steps, device=args.device,
        data="synthetic: one random batch per process, made on the device before timing (no data loading timed)",
        step="zoo finetune's training step: autocast forward, cross-entropy, backward, clip_grad_norm 1.0, AdamW",
        runs=[dict(single, command=shlex.join(cmd1)), dict(multi, command=shlex.join(cmdn))], **summary,
        command="PYTHONPATH=. python " + shlex.join(["benchmarks/ddp_scaling.py", *argv]),
        torch=torch.__version__, host=platform.node(), wall_seconds=time.perf_counter() - wall,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"[ddp_scaling] {args.model} {args.img_size}px {args.amp}, batch {args.batch_per_gpu} per process: "
          f"1 -> {single['images_per_s']:.1f} images/s, {nproc} -> {multi['images_per_s']:.1f} images/s; "
          f"speed-up {summary['speedup']:.2f}x, efficiency {summary['efficiency']:.1%}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
