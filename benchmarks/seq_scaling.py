"""Time and memory against sequence length: Mamba against a Transformer of the same size.

    PYTHONPATH=. python benchmarks/seq_scaling.py --device cpu  --out benchmarks/results/seq_scaling_cpu
    PYTHONPATH=. python benchmarks/seq_scaling.py --device cuda --out benchmarks/results/seq_scaling_cuda

Two comparisons, each timed for inference (forward under ``torch.inference_mode``) and for a training step
(forward + backward of the mean output, no optimizer step):

- ``sequence``: a causal Mamba block stack (zoo.core: RMSNorm -> Mamba, d_state 16, expand 2, pre-norm
  residual blocks) against a causal pre-norm Transformer (GPT-style blocks, attention through PyTorch's
  ``scaled_dot_product_attention(is_causal=True)``: flash / memory-efficient kernels, no (L, L) mask), same
  width and depth, the Transformer's MLP width chosen so both have the same parameter count (both counts are
  recorded), on random (batch, length, dim) inputs.
- ``vision``: zoo's ``vim_tiny`` against timm's ``deit_tiny_patch16_224``, both built for each image size
  (patch 16: (size / 16)^2 tokens), random weights, random images.

Per point: ``--warmup`` untimed steps, then the median of ``--reps`` timed steps (CUDA synchronised).
Memory: on CUDA ``torch.cuda.max_memory_allocated`` over the timed steps minus the memory allocated before
them (weights and inputs excluded); on CPU the peak increase of the process's resident set size over the
timed steps (Linux VmHWM, reset through /proc/self/clear_refs after malloc_trim). CUDA runs use bfloat16
autocast (``--no-amp``: float32) and zoo's Triton scan; CPU runs use float32 and zoo's chunked PyTorch scan.
An out-of-memory error or a step over ``--max-step-seconds`` ends that model's sweep (recorded); the whole run
stops measuring after ``--time-budget`` seconds and still writes what it measured. The JSON (with the command)
is rewritten after every point; the PNG plots are drawn at the end (matplotlib).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import zoo  # noqa: E402
from zoo.core import Mamba, ResidualBlock, RMSNorm  # noqa: E402
from zoo.tasks.bench import _proc_status_kib, _reset_rss_peak  # noqa: E402

DEFAULTS = {
    "cpu": dict(lengths=[256, 512, 1024, 2048, 4096], sizes=[64, 128, 224, 320], batch=1, vision_batch=1),
    "cuda": dict(lengths=[1024, 2048, 4096, 8192, 16384, 32768, 65536], sizes=[224, 384, 512, 768, 1024, 1280],
                 batch=4, vision_batch=8),
}


class MambaStack(nn.Module):
    """Pre-norm residual Mamba blocks (zoo.core), as in a Mamba language model without the embedding."""

    def __init__(self, dim: int, depth: int, d_state: int = 16, expand: int = 2):
        super().__init__()
        self.layers = nn.ModuleList([
            ResidualBlock(dim, Mamba(dim, d_state=d_state, expand=expand, layer_idx=i), RMSNorm(dim)) for i in range(depth)
        ])
        self.norm_f = RMSNorm(dim)

    def forward(self, x):
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual)
        x = x + residual if residual is not None else x
        return self.norm_f(x.to(self.norm_f.weight.dtype))


class TransformerBlock(nn.Module):
    """Pre-norm Transformer block: causal multi-head attention through ``F.scaled_dot_product_attention``
    (flash / memory-efficient kernels, no (L, L) mask materialised), then a GELU MLP."""

    def __init__(self, dim: int, heads: int, ffn: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(), nn.Linear(ffn, dim))

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, n, c))
        return x + self.mlp(self.norm2(x))


class TransformerStack(nn.Module):
    """Pre-norm causal Transformer blocks and a final LayerNorm (GPT-style, without the embedding)."""

    def __init__(self, dim: int, depth: int, heads: int, ffn: int):
        super().__init__()
        self.blocks = nn.ModuleList([TransformerBlock(dim, heads, ffn) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def matched_transformer(dim: int, depth: int, heads: int, target: int) -> TransformerStack:
    """The Transformer whose feed-forward width brings its parameter count closest to ``target``."""
    base = n_params(TransformerStack(dim, depth, heads, 8))
    per_ffn = (n_params(TransformerStack(dim, depth, heads, 16)) - base) / 8  # params per feed-forward unit
    ffn = max(8, round((target - base) / per_ffn) + 8)
    return TransformerStack(dim, depth, heads, ffn)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model, make_input, mode, device, amp, warmup, reps):
    """Median seconds per step and peak memory increase (bytes) of ``reps`` steps."""
    x = make_input()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(x)
        if mode == "train":
            out.float().mean().backward()
            for p in model.parameters():
                p.grad = None

    ctx = torch.inference_mode() if mode == "infer" else torch.enable_grad()
    model.train(mode == "train")
    with ctx:
        for _ in range(warmup):
            step()
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        else:
            can_reset = _reset_rss_peak()
            base = _proc_status_kib("VmRSS")
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            step()
            sync(device)
            times.append(time.perf_counter() - t)
    if device.type == "cuda":
        mem = torch.cuda.max_memory_allocated(device) - base
    else:
        mem = (_proc_status_kib("VmHWM") - base) * 1024 if can_reset and base is not None else None
    return statistics.median(times), mem


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sweep(bench, name, build, points, make_input_for, tokens_for, device, args, out, deadline, save):
    """Measure ``build(point)`` at every point for both modes; one record per (mode, point)."""
    for mode in ("infer", "train"):
        stopped = None
        for pt in points:
            rec = {"bench": bench, "model": name, "mode": mode, "x": pt, "tokens": tokens_for(pt)}
            if stopped:
                rec.update(status="skipped", reason=stopped)
            elif time.perf_counter() > deadline:
                rec.update(status="skipped", reason=f"--time-budget {args.time_budget:g} s used up")
            else:
                model = None
                try:
                    model = build(pt).to(device)
                    rec["params"] = n_params(model)
                    secs, mem = measure(model, lambda: make_input_for(pt), mode, device, args.amp, args.warmup, args.reps)
                    rec.update(status="ok", seconds=secs, peak_memory_bytes=mem,
                               tokens_per_s=rec["tokens"] * make_input_for.batch / secs)
                    if secs > args.max_step_seconds:
                        stopped = f"a step took {secs:.1f} s > --max-step-seconds at {pt}"
                except Exception as e:  # noqa: BLE001 - recorded, the sweep goes on with the other model
                    rec.update(status="oom" if is_oom(e) else "error", error=f"{type(e).__name__}: {str(e)[:300]}")
                    stopped = f"{rec['status']} at {pt}"
                del model
                free(device)
            out["results"].append(rec)
            shown = (f"{rec['seconds'] * 1e3:9.1f} ms  {(rec['peak_memory_bytes'] or 0) / 2**20:9.1f} MiB"
                     if rec["status"] == "ok" else rec["status"])
            print(f"{name:>24} {mode:>5} {pt:>6}: {shown}", flush=True)
            save()


def plot(out, path_prefix: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for bench, xlabel in (("sequence", "sequence length (tokens)"), ("vision", "image size (pixels; tokens = (size/16)^2)")):
        rows = [r for r in out["results"] if r["bench"] == bench and r["status"] == "ok"]
        if not rows:
            continue
        fig, axes = plt.subplots(2, 2, figsize=(11, 8))
        for col, mode in enumerate(("infer", "train")):
            for model in dict.fromkeys(r["model"] for r in out["results"] if r["bench"] == bench):
                pts = sorted((r["x"], r["seconds"], r["peak_memory_bytes"]) for r in rows if r["model"] == model and r["mode"] == mode)
                if not pts:
                    continue
                params = next(r["params"] for r in rows if r["model"] == model)
                label = f"{model} ({params / 1e6:.2f}M)"
                xs = [p[0] for p in pts]
                axes[0, col].plot(xs, [p[1] * 1e3 for p in pts], "o-", label=label)
                mem = [(x, m / 2**20) for x, _, m in pts if m is not None]
                if mem:
                    axes[1, col].plot([m[0] for m in mem], [max(m[1], 1e-3) for m in mem], "o-", label=label)
            title = "inference (forward)" if mode == "infer" else "training step (forward + backward)"
            axes[0, col].set_title(f"{title}: time")
            axes[1, col].set_title(f"{title}: peak memory increase")
            axes[0, col].set_ylabel("ms per step (median)")
            axes[1, col].set_ylabel("MiB")
            for ax in axes[:, col]:
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel(xlabel)
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=8)
        b = out["settings"]["batch"] if bench == "sequence" else out["settings"]["vision_batch"]
        fig.suptitle(f"{bench}: {out['device_name']}, batch {b}, "
                     f"{'bf16 autocast' if out['settings']['amp'] else 'float32'}, torch {out['torch']}"
                     + ("" if out["device"] == "cuda" else f", {out['threads']} CPU thread(s)"), fontsize=10)
        fig.tight_layout()
        path = path_prefix.parent / f"{path_prefix.name}_{bench}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    return written


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/seq_scaling_<device>)")
    p.add_argument("--benches", nargs="+", default=["sequence", "vision"], choices=["sequence", "vision"])
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="sequence lengths (default per device)")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="image sizes for the vision pair (default per device)")
    p.add_argument("--dim", type=int, default=256, help="width of both sequence stacks")
    p.add_argument("--depth", type=int, default=4, help="blocks in both sequence stacks")
    p.add_argument("--heads", type=int, default=4, help="attention heads of the Transformer")
    p.add_argument("--batch", type=int, default=None, help="sequence batch (default: 1 on CPU, 4 on CUDA)")
    p.add_argument("--vision-batch", type=int, default=None, help="image batch (default: 1 on CPU, 8 on CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 1 on CPU, 3 on CUDA)")
    p.add_argument("--reps", type=int, default=None, help="timed steps (default 3 on CPU, 10 on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="CUDA: float32 instead of bf16 autocast")
    p.add_argument("--max-step-seconds", type=float, default=None, help="stop a model's sweep after a slower step "
                   "(default 20 on CPU, 2 on CUDA)")
    p.add_argument("--time-budget", type=float, default=None, help="stop measuring after this many seconds "
                   "(default 900 on CPU, 120 on CUDA)")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device visible to torch")
    d = DEFAULTS[args.device]
    args.lengths = args.lengths or d["lengths"]
    args.sizes = args.sizes or d["sizes"]
    args.batch = args.batch or d["batch"]
    args.vision_batch = args.vision_batch or d["vision_batch"]
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    args.reps = args.reps or (10 if cuda else 3)
    args.amp = args.amp and cuda
    args.max_step_seconds = args.max_step_seconds or (2.0 if cuda else 20.0)
    args.time_budget = args.time_budget or (120.0 if cuda else 900.0)
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out or f"benchmarks/results/seq_scaling_{args.device}")
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    start = time.perf_counter()
    deadline = start + args.time_budget
    try:
        from zoo.core.selective_scan.op import _resolve

        scan = _resolve("auto", device).__name__
    except Exception as e:  # noqa: BLE001
        scan = f"unknown ({e})"

    out = {
        "command": "PYTHONPATH=. python " + shlex.join(["benchmarks/seq_scaling.py", *(sys.argv[1:] if argv is None else argv)]),
        "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if cuda else (platform.processor() or platform.machine()),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
        "selective_scan": scan,
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,  # other jobs' CPU use
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "memory_method": ("torch.cuda.max_memory_allocated over the timed steps minus memory allocated before them"
                          if cuda else "peak RSS increase over the timed steps (VmHWM after malloc_trim and a "
                          "/proc/self/clear_refs reset)"),
        "train_step": "forward + backward of the mean output, gradients dropped; no optimizer step",
        "results": [],
    }
    json_path = out_dir / f"seq_scaling_{args.device}.json"

    def save():
        out["wall_seconds"] = time.perf_counter() - start
        out["load_average_now"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        json_path.write_text(json.dumps(out, indent=1) + "\n")

    if "sequence" in args.benches:
        torch.manual_seed(0)
        mamba_params = n_params(MambaStack(args.dim, args.depth))
        tf = matched_transformer(args.dim, args.depth, args.heads, mamba_params)
        ffn = tf.blocks[0].mlp[0].out_features
        out["sequence"] = {"dim": args.dim, "depth": args.depth, "heads": args.heads, "transformer_ffn": ffn,
                           "mamba_params": mamba_params, "transformer_params": n_params(tf), "batch": args.batch}
        print(f"sequence: MambaStack {mamba_params:,} params vs Transformer (ffn {ffn}) {n_params(tf):,} params",
              flush=True)

        def seq_input(length):
            return torch.randn(args.batch, length, args.dim, device=device)

        seq_input.batch = args.batch
        sweep("sequence", f"mamba_d{args.dim}x{args.depth}", lambda L: MambaStack(args.dim, args.depth), args.lengths, seq_input,
              lambda L: L, device, args, out, deadline, save)
        sweep("sequence", f"transformer_d{args.dim}x{args.depth}", lambda L: TransformerStack(args.dim, args.depth, args.heads, ffn),
              args.lengths, seq_input, lambda L: L, device, args, out, deadline, save)

    if "vision" in args.benches:
        import timm

        def img_input(size):
            return torch.randn(args.vision_batch, 3, size, size, device=device)

        img_input.batch = args.vision_batch
        sweep("vision", "vim_tiny", lambda s: zoo.create_model("vim_tiny", img_size=s), args.sizes, img_input,
              lambda s: (s // 16) ** 2 + 1, device, args, out, deadline, save)
        sweep("vision", "deit_tiny_patch16_224", lambda s: timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=s),
              args.sizes, img_input, lambda s: (s // 16) ** 2 + 1, device, args, out, deadline, save)

    save()
    try:
        out["plots"] = plot(out, out_dir / f"seq_scaling_{args.device}")
    except ImportError as e:
        out["plots"] = f"not drawn: {e} (pip install 'mamba-zoo[plot]')"
    save()
    print(f"wrote {json_path}" + (f" and {', '.join(out['plots'])}" if isinstance(out["plots"], list) else f"; {out['plots']}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
