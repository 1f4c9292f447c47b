"""Quamba2 real low-bit inference (zoo.research.quamba2) beside MambaQuant's fake quantization.

Accuracy (CPU is fine): every shipped tag whose weights are in the package (zoo/weights), on its recorded test
split, in fp32, MambaQuant W8A8 / W4A8 (fake-quant simulation, benchmarks/mambaquant.py's settings) and Quamba2
W8A8 / W4A8 / W4A16 (int8 / packed-int4 weights, integer matmuls), with Quamba2 W8A8 without sort-and-cluster as
the ablation; calibration on the same 4 training batches as benchmarks/mambaquant.py. Also the bytes of each
model's parameters and buffers.

    PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/quamba2.py --out benchmarks/results/quamba2_shipped.json

GPU latency and memory (bf16 against each scheme; random weights, calibration on random inputs), a vision entry
(vim_small at 224, batch 64 forward) and an LM entry (mamba_130m: prefill of batch 1 x 2048 tokens, and decode
steps at batch 1 and 32 after a 128-token prompt):

    PYTHONPATH=. python benchmarks/quamba2.py --gpu --out benchmarks/results/quamba2_h200.json
"""
from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from zoo.research.quamba2 import SCHEMES, model_bytes, quantize_model  # noqa: E402

SHIPPED = ["vim_tiny.digits", "pointmamba_tiny.shapes3d", "mambamil.digit_bags", "smamba_classifier.basicmotions",
           "mamba_kws_tiny.kws", "mamba_ctc_causal_tiny.digits", "mamba_tiny_lm.kjv", "mamba2_tiny_lm.kjv",
           "mamba_ctc_tiny.sentences", "samba_asr_tiny.sentences"]
# Error rates and bits per byte: lower is better, so their drop is (quantized - fp32); bits per byte are not percentages.
LOWER_IS_BETTER = {"cer", "wer", "bits_per_byte"}
NOT_PERCENT = {"bits_per_byte"}
SETTINGS = [("fp32", None), ("MambaQuant", "W8A8"), ("MambaQuant", "W4A8"), ("Quamba2", "W8A8"),
            ("Quamba2 no sort-and-cluster", "W8A8"), ("Quamba2", "W4A8"), ("Quamba2", "W4A16")]


def _convert(model, calib, method, scheme):
    if method == "fp32":
        return model
    if method == "MambaQuant":
        w, a = SCHEMES[scheme]
        from zoo.research.mambaquant import quantize_model as mq

        return mq(copy.deepcopy(model), calib, "mambaquant", w, a)
    return quantize_model(copy.deepcopy(model), calib, scheme, sort_cluster=method == "Quamba2")


def _scale(metric: str) -> float:
    return 1.0 if metric in NOT_PERCENT else 100.0


def _digits(metric: str) -> int:
    return 4 if metric in NOT_PERCENT else 2


def worse_by(metric: str, fp32: float, value: float) -> float:
    """How much worse ``value`` is than the fp32 model's (points, or bits per byte); negative when better."""
    return round(_scale(metric) * (value - fp32 if metric in LOWER_IS_BETTER else fp32 - value), 4)


def accuracy(args) -> dict:
    from mambaquant import ENTRIES

    rows, results = [], []
    for tag in args.entries:
        start = time.perf_counter()
        model, calib, evaluate, config = ENTRIES[tag](0, args.seed)
        base = evaluate(model)
        fp32_bytes = model_bytes(model)
        for method, scheme in SETTINGS:
            q = _convert(model, calib, method, scheme)
            metrics = base if method == "fp32" else evaluate(q)
            label = method if scheme is None else f"{method} {scheme}"
            res = dict(entry=tag, setting=label, **metrics, model_bytes=model_bytes(q),
                       drop={k: worse_by(k, base[k], v) for k, v in metrics.items()})
            print(json.dumps(res), flush=True)
            results.append(res)
            size = "" if method == "MambaQuant" else f"{res['model_bytes'] / 1024:.0f} KiB ({fp32_bytes / res['model_bytes']:.1f}x)"
            rows.append(f"| {tag} | {label} | " + ", ".join(f"{k} {_scale(k) * v:.{_digits(k)}f}" for k, v in metrics.items())
                        + " | " + ", ".join(f"{v:+.{_digits(k)}f}" for k, v in res["drop"].items()) + f" | {size} |")
        results.append(dict(entry=tag, config=config, seconds=round(time.perf_counter() - start, 1)))
    table = "\n".join(["| entry | setting | test metric (% but bits per byte) | worse than fp32 by (points; bits per byte) "
                       "| stored model (vs fp32) |",
                       "|---|---|---|---|---|", *rows])
    print(table)
    return dict(results=results, table=table,
                note="Quamba2: real int8 / packed-int4 weights, torch._int_mm for 8-bit activations, scan inputs x / B / C "
                     "/ dt / z rounded to int8 (x by sort-and-cluster, B and C per state group), round-to-nearest "
                     "weights; MambaQuant: fake-quant simulation (zoo.research.mambaquant). Calibration: 4 training "
                     "batches. Stored model: parameters + buffers (MambaQuant's simulation keeps float weights).")


def _time(fn, iters: int, warmup: int = 3) -> float:
    """Median milliseconds of ``fn`` (CUDA events on the GPU, the wall clock elsewhere)."""
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def _peak(fn):
    """Peak bytes allocated above what was resident, during one call (None off the GPU)."""
    if not torch.cuda.is_available():
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


GPU_ENTRIES = {  # name -> (create_model kwargs, kind); the *_tiny ones only for a CPU dry run (--smoke)
    "vim_small": (dict(model_name="vim_small", img_size=224), "vision"),
    "mamba_130m": (dict(model_name="mamba_130m"), "lm"),
    "vim_tiny": (dict(model_name="vim_tiny", img_size=224), "vision"),
    "mamba_tiny_lm": (dict(model_name="mamba_tiny_lm", n_layer=2), "lm"),
}


@torch.no_grad()
def gpu(args) -> dict:
    import zoo

    if args.smoke:
        dev, dtype = torch.device("cpu"), torch.float32
        entries, batch, prefill, decode_batches, iters = ["vim_tiny", "mamba_tiny_lm"], 2, 64, (1, 2), 2
    else:
        if not torch.cuda.is_available():
            raise SystemExit("benchmarks/quamba2.py --gpu: needs a CUDA GPU (--smoke: a short CPU dry run)")
        dev, dtype = torch.device("cuda"), torch.bfloat16
        entries, batch, prefill, decode_batches, iters = args.gpu_entries, args.batch, 2048, (1, 32), args.iters
    torch.manual_seed(0)
    results = []
    for name in entries:
        kwargs, kind = GPU_ENTRIES[name]
        base = zoo.create_model(**kwargs).to(dev, dtype).eval()
        if kind == "vision":
            make_input = lambda b: torch.randn(b, 3, 224, 224, device=dev, dtype=dtype)  # noqa: E731
        else:
            vocab = base.backbone.embedding.num_embeddings
            make_input = lambda b, n=512: torch.randint(0, vocab, (b, n), device=dev)  # noqa: E731
        calib = [make_input(4) for _ in range(2)]
        for scheme in ["bf16" if dtype == torch.bfloat16 else "fp32", *SCHEMES]:
            model = base if scheme in ("bf16", "fp32") else quantize_model(copy.deepcopy(base), calib, scheme)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            row = dict(entry=name, scheme=scheme, weights_bytes=model_bytes(model))
            if kind == "vision":
                x = make_input(batch)
                row[f"forward_ms_batch{batch}"] = ms = _time(lambda: model(x), iters)
                row["img_per_s"] = round(batch / ms * 1e3, 1)
                row["peak_extra_bytes"] = _peak(lambda: model(x))
            else:
                ids = make_input(1, prefill)
                row[f"prefill_ms_1x{prefill}"] = _time(lambda: model(ids), iters)
                row["prefill_peak_extra_bytes"] = _peak(lambda: model(ids))
                for b in decode_batches:
                    prompts = make_input(b, 128).tolist()

                    def decode():
                        logits, cache = model.prefill(prompts, max_new_tokens=33)
                        tok = logits.argmax(-1)
                        if dev.type == "cuda":
                            torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        for _ in range(32):
                            tok = model.decode_step(tok, cache).argmax(-1)
                        if dev.type == "cuda":
                            torch.cuda.synchronize()
                        return (time.perf_counter() - t0) / 32 * 1e3

                    decode()
                    row[f"decode_ms_per_token_batch{b}"] = sorted(decode() for _ in range(3))[1]
            print(json.dumps(row), flush=True)
            results.append(row)
            del model
    rows = []
    for r in results:
        metrics = {k: v for k, v in r.items() if k not in ("entry", "scheme") and v is not None}
        rows.append(f"| {r['entry']} | {r['scheme']} | " + ", ".join(
            f"{k} {v / 2**20:.1f} MiB" if k.endswith("bytes") else f"{k} {v:.3f}" for k, v in metrics.items()) + " |")
    table = "\n".join(["| entry | scheme | measurements |", "|---|---|---|", *rows])
    print(table)
    return dict(results=results, table=table, device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
                note="random weights; bf16 activations on the GPU; calibration on 2 random batches of 4; latency: median "
                     "of CUDA-event timings; peak_extra_bytes: max allocated above what was resident during one call; "
                     "decode: 32 decode_step calls after a 128-token prefill, ms per token (median of 3 runs)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--entries", nargs="+", default=SHIPPED, choices=SHIPPED)
    p.add_argument("--gpu", action="store_true", help="latency and memory on the GPU instead of accuracy")
    p.add_argument("--gpu-entries", nargs="+", default=["vim_small", "mamba_130m"], choices=["vim_small", "mamba_130m"])
    p.add_argument("--smoke", action="store_true", help="with --gpu: a short dry run of the GPU mode on the CPU (tiny models)")
    p.add_argument("--batch", type=int, default=64, help="vision batch (--gpu)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    out = gpu(args) if args.gpu else accuracy(args)
    if args.out:
        Path(args.out).write_text(json.dumps(dict(
            command="PYTHONPATH=. python benchmarks/quamba2.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
            seed=args.seed, threads=torch.get_num_threads(), torch=torch.__version__, **out), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
