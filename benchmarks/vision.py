"""Vision throughput: images/s and peak memory of inference and training steps, zoo entries next to timm's
DeiT / Swin / ConvNeXt of similar size, at several resolutions, in one run.

    python benchmarks/vision.py --device cuda --out results/vision.json          # 224, 512, 1024
    python benchmarks/vision.py --device cpu --quick --sizes 32 --models vim_tiny deit_tiny_patch16_224

Per (model, resolution, mode): build the model (random weights), ``warmup`` untimed steps, then the median
wall time of ``reps`` steps (CUDA synchronised around each). Inference: ``model(x)`` under
``torch.inference_mode`` in eval mode; ``infer_graph``: the same captured once in a CUDA graph and replayed. Training: forward, cross-entropy on random labels, backward and an
AdamW step in train mode. bf16 autocast on CUDA (``--no-amp`` for float32); ``cudnn.benchmark`` on. Peak
memory is ``torch.cuda.max_memory_allocated`` over the timed steps, from a reset after the model and
optimizer are built (CUDA only). An out-of-memory error is recorded as ``"status": "oom"`` and the run goes
on; so is any other error (``"status": "error"``, with its message).

When ``mamba_ssm`` is importable, every zoo entry is timed a second time with its selective scans replaced
by mamba-ssm's ``selective_scan_fn`` (Vim: one call per direction, the reverse one on flipped copies as the
official Vim does; VMamba / EfficientVMamba: one call over the four cross-scanned copies with per-direction
groups as the official SS2D does); only the scan is swapped, convolutions and projections stay the zoo's.
``ratios`` gives zoo / mamba-ssm images/s per cell. Without it the
JSON says why the comparison could not be made. The JSON is rewritten after every measurement, so a run cut
short keeps what it measured.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import zoo  # noqa: E402
from zoo.inference import CUDAGraphModel  # noqa: E402

ZOO_MODELS = ["vim_tiny", "vim_small", "vmamba_tiny", "efficient_vmamba_tiny", "efficient_vmamba_small"]
TIMM_MODELS = ["deit_tiny_patch16_224", "deit_small_patch16_224", "swin_tiny_patch4_window7_224", "convnext_tiny"]
# Batch per resolution: one batch for every model at a size, so memory columns compare.
DEFAULT_BATCH = {224: 64, 512: 16, 1024: 4}
# Models whose position embedding / attention windows are laid out for one input size: built for the size run.
_TAKES_IMG_SIZE = ("vim_", "deit_", "swin_")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# "deit_tiny_patch16_224@eager": the timm model with attention written out (softmax(QK^T)V, the (N, N)
# matrix materialised), as the Vim paper's DeiT baseline ran; without the suffix timm uses fused SDPA.
EAGER = "@eager"


def build(name: str, size: int, device: torch.device) -> torch.nn.Module:
    kwargs = dict(img_size=size) if name.startswith(_TAKES_IMG_SIZE) else {}
    if name in zoo.list_models():
        model = zoo.create_model(name, **kwargs)
    elif name.endswith(EAGER):
        fused = timm.layers.use_fused_attn()
        timm.layers.set_fused_attn(False)  # read by timm's Attention modules at construction
        try:
            model = timm.create_model(name[: -len(EAGER)], pretrained=False, **kwargs)
        finally:
            timm.layers.set_fused_attn(fused)
    else:
        model = timm.create_model(name, pretrained=False, **kwargs)
    return model.to(device)


def time_steps(step, device: torch.device, warmup: int, reps: int) -> list:
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def graphed_inference(model, x, autocast_dtype, device: torch.device):
    """``model(x)`` captured once in a CUDA graph (``zoo.inference.CUDAGraphModel``); the returned step replays
    it. This removes the host's per-kernel launch cost (Python, dispatcher, Triton launcher), which bounds
    small-batch inference of deep models with many small kernels, and leaves the GPU time."""
    if device.type != "cuda":
        raise RuntimeError(f"infer_graph needs CUDA, got device {device}")
    return CUDAGraphModel(model, autocast_dtype=autocast_dtype).replay_function(x)


def measure(name: str, size: int, batch: int, mode: str, args, device: torch.device) -> dict:
    """One (model, size, mode) cell: images/s, ms per step, peak memory; OOM and other errors as statuses."""
    row = dict(model=name, source="zoo" if name in zoo.list_models() else "timm", size=size, batch=batch, mode=mode)
    model = optimizer = None
    try:
        model = build(name, size, device)
        row["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
        x = torch.randn(batch, 3, size, size, device=device)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp)
        if mode == "infer":
            model.eval()

            def step():
                with torch.inference_mode(), autocast:
                    model(x)
        elif mode == "infer_graph":
            model.eval()
            step = graphed_inference(model, x, torch.bfloat16 if args.amp else None, device)
        else:
            model.train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
            labels = torch.randint(0, model.num_classes, (batch,), device=device)

            def step():
                with autocast:
                    loss = F.cross_entropy(model(x).float(), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

        if device.type == "cuda":
            step()  # first step allocates optimizer state: outside the peak-memory window as the model is
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        times = time_steps(step, device, args.warmup, args.reps)
        ms = statistics.median(times) * 1e3
        row.update(status="ok", ms_per_step=round(ms, 3), images_per_s=round(batch / ms * 1e3, 2))
        if device.type == "cuda":
            row["peak_mem_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    except torch.OutOfMemoryError:
        row.update(status="oom")
    except Exception as e:  # a model that cannot run this size: recorded, and the table goes on
        row.update(status="error", error=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
    finally:
        del model, optimizer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


# --- the same zoo models on mamba-ssm's selective_scan_fn --------------------------------------------------

def _mamba_ssm_scan(selective_scan_fn):
    """Stand-in for zoo.core.selective_scan.selective_scan (channels-last) on mamba-ssm's (b, d, l) kernel."""

    def scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False,
             reverse=False, initial_state=None, cu_seqlens=None, impl="auto", negative_eigenvalues=False):
        if initial_state is not None or cu_seqlens is not None or negative_eigenvalues:
            raise NotImplementedError("mamba-ssm comparison: initial_state / cu_seqlens / negative_eigenvalues are not "
                                      "used by the vision models")
        t = (lambda a: a.flip(1)) if reverse else (lambda a: a)  # Vim's backward direction: flip, scan, flip
        bc = (lambda a: t(a).transpose(1, 2).contiguous()) if B.dim() == 3 else (lambda a: t(a).permute(0, 2, 3, 1).contiguous())
        out = selective_scan_fn(
            t(u).transpose(1, 2).contiguous(), t(delta).transpose(1, 2).contiguous(), A, bc(B), bc(C), D,
            None if z is None else t(z).transpose(1, 2).contiguous(), delta_bias, delta_softplus, return_last_state,
        )
        y, last = out if return_last_state else (out, None)
        y = t(y.transpose(1, 2))
        return (y, last) if return_last_state else y

    return scan


def _order(name: str, length: int, hw, device) -> torch.Tensor:
    order = torch.arange(length, device=device)
    if name.endswith("_t"):
        order = order.view(*hw).t().reshape(-1)
    return order.flip(0) if name.startswith("reverse") else order


def _mamba_ssm_multi(selective_scan_fn):
    """Stand-in for selective_scan_multi as the official SS2D runs it: the K cross-scanned copies (gathered in
    each direction's visiting order) stacked to K * d channels, B / C as K groups, one selective_scan_fn call,
    outputs scattered back to image positions."""

    def scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False,
             directions=("forward", "reverse"), hw=None, initial_state=None, cu_seqlens=None, impl="auto"):
        if z is not None or return_last_state or initial_state is not None or cu_seqlens is not None:
            raise NotImplementedError("mamba-ssm comparison: only the arguments the vision models use are supported")
        K, b, L, d = delta.shape
        orders = [_order(n, L, hw, u.device) for n in directions]
        us = u if u.dim() == 4 else u.unsqueeze(0).expand(K, -1, -1, -1)

        def stack(t):  # (K, b, L, c) -> (b, K, c, L) in each direction's order
            return torch.stack([t[k][:, orders[k]] for k in range(K)], 1).transpose(2, 3)

        y = selective_scan_fn(
            stack(us).reshape(b, K * d, L), stack(delta).reshape(b, K * d, L), A.reshape(K * d, -1),
            stack(B).contiguous(), stack(C).contiguous(), D.reshape(-1), None, delta_bias.reshape(-1), delta_softplus,
        ).view(b, K, d, L)
        out = torch.empty(K, b, L, d, device=y.device, dtype=y.dtype)
        for k in range(K):
            out[k][:, orders[k]] = y[:, k].transpose(1, 2)
        return out

    return scan


@contextlib.contextmanager
def mamba_ssm_scans(selective_scan_fn):
    """Within the block, the zoo's vision models scan with mamba-ssm's kernel (module attributes patched)."""
    import zoo.core.mamba as core_mamba
    from zoo.models.vision import efficient_vmamba, vmamba

    patches = [(core_mamba, "selective_scan", _mamba_ssm_scan(selective_scan_fn))]
    patches += [(m, "selective_scan_multi", _mamba_ssm_multi(selective_scan_fn)) for m in (vmamba, efficient_vmamba)]
    saved = [(m, a, getattr(m, a)) for m, a, _ in patches]
    try:
        for m, a, fn in patches:
            setattr(m, a, fn)
        yield
    finally:
        for m, a, fn in saved:
            setattr(m, a, fn)


def _mamba_ssm():
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as e:  # not installed, or installed without its CUDA extension
        return None, f"mamba_ssm not importable here ({type(e).__name__}: {e}); the comparison could not be made"
    return selective_scan_fn, None


def _scan_path(device: torch.device) -> str:
    if device.type != "cuda":
        return "PyTorch chunked scan (CPU)"
    try:
        import zoo.kernels.selective_scan  # noqa: F401  (the path "auto" takes on CUDA when it imports)
        return "zoo Triton kernels"
    except ImportError as e:
        return f"PyTorch chunked scan (Triton kernels not importable: {e})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", nargs="+", default=ZOO_MODELS + TIMM_MODELS, help="zoo entries and timm names")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="image sides (default 224 512 1024; --quick: 224 512)")
    p.add_argument("--batch", type=int, default=None, help=f"batch at every size (default per size: {DEFAULT_BATCH})")
    p.add_argument("--modes", nargs="+", choices=("infer", "infer_graph", "train"), default=["infer", "train"],
                   help="infer_graph: inference replayed from a CUDA graph (no host launch cost; CUDA only)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 5; --quick 2)")
    p.add_argument("--reps", type=int, default=None, help="timed steps, median reported (default 20; --quick 5)")
    p.add_argument("--quick", action="store_true", help="fewer steps, sizes 224 and 512 unless --sizes")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="float32 instead of bf16 autocast (CUDA)")
    p.add_argument("--no-mamba-ssm", action="store_true", help="skip the mamba-ssm comparison even when importable")
    p.add_argument("--out", default=None, help="write the JSON here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    args.amp = args.amp and device.type == "cuda"  # bf16 autocast on CPU would time a different program
    sizes = args.sizes or ([224, 512] if args.quick else [224, 512, 1024])
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5)
    args.reps = args.reps if args.reps is not None else (5 if args.quick else 20)
    torch.backends.cudnn.benchmark = True
    unknown = [m for m in args.models if m not in zoo.list_models() and not timm.is_model(m.removesuffix(EAGER))]
    if unknown:
        p.error(f"unknown models {unknown}: expected zoo entries ({', '.join(ZOO_MODELS)}, ...) or timm names "
                f"(optionally with {EAGER!r} for unfused attention)")

    ssm_fn, ssm_reason = (None, "skipped (--no-mamba-ssm)") if args.no_mamba_ssm else _mamba_ssm()
    if ssm_fn is not None and device.type != "cuda":
        ssm_fn, ssm_reason = None, "mamba-ssm's kernels need CUDA; the comparison could not be made on this device"
    result = dict(
        benchmark="vision", command="python " + shlex.join(sys.argv if argv is None else ["benchmarks/vision.py", *argv]),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__, timm=timm.__version__, zoo=zoo.__version__, amp="bf16" if args.amp else "fp32",
        cudnn_benchmark=True, warmup=args.warmup, reps=args.reps, zoo_scan=_scan_path(device),
        mamba_ssm=dict(available=ssm_fn is not None, note=ssm_reason), rows=[],
    )
    out = Path(args.out) if args.out else None

    def record(row):
        result["rows"].append(row)
        shown = (f"{row['images_per_s']:>9.1f} img/s  {row['ms_per_step']:>9.2f} ms" if row["status"] == "ok"
                 else f"{row['status']:>9}  {row.get('error', '')[:80]}")
        mem = f"  {row['peak_mem_mib']:>8.0f} MiB" if "peak_mem_mib" in row else ""
        print(f"{row['model']:<32} {row.get('scan', ''):<9} {row['size']:>5} x{row['batch']:<3} {row['mode']:<5} {shown}{mem}", flush=True)
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1) + "\n")

    for size in sizes:
        batch = args.batch or DEFAULT_BATCH.get(size, max(1, 64 * 224**2 // size**2))
        for name in args.models:
            for mode in args.modes:
                row = measure(name, size, batch, mode, args, device)
                if row["source"] == "zoo":
                    row["scan"] = "zoo"
                record(row)
                if row["source"] == "zoo" and ssm_fn is not None:
                    with mamba_ssm_scans(ssm_fn):
                        record({**measure(name, size, batch, mode, args, device), "scan": "mamba_ssm"})

    # zoo / mamba-ssm images/s for each cell measured both ways.
    by_key = {(r["model"], r["size"], r["mode"], r.get("scan")): r for r in result["rows"]}
    result["ratios"] = [
        dict(model=m, size=s, mode=mode, zoo_over_mamba_ssm=round(r["images_per_s"] / other["images_per_s"], 3))
        for (m, s, mode, scan), r in by_key.items()
        if scan == "zoo" and r["status"] == "ok"
        and (other := by_key.get((m, s, mode, "mamba_ssm"))) is not None and other["status"] == "ok"
    ]
    if out:
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
