"""The SSD (Mamba-2) scan on the GPU: the zoo's Triton kernels beside mamba-ssm's Triton SSD
(``mamba_chunk_scan_combined``) in the same process: forward, forward+backward, peak extra memory, and the error
of each against a float64 reference; plus the zoo's variants (D, z gate, dt bias + softplus, reverse, negative
eigenvalues) and a sweep of its launch settings.

    # mamba-ssm's sources laid out as in ../shared/anchors/README.md (only mamba_ssm/ is needed: pure Triton)
    PYTHONPATH=. python benchmarks/ssd.py --src .anchors --out $OUT/ssd.json --sweep

Results: benchmarks/results/ssd_h200.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import types

import torch

import zoo.kernels.ssd.function as ssd_fn
from zoo.core.ssd import ssd_scan

SHAPE = dict(batch=8, length=4096, nheads=32, headdim=64, d_state=128, ngroups=1)  # the reference shape


def load_mamba_ssd(src: str):
    """mamba-ssm's mamba_chunk_scan_combined from its sources (pure Triton: nothing to compile)."""
    root = os.path.abspath(src)
    pkg = types.ModuleType("mamba_ssm")
    pkg.__path__ = [os.path.join(root, "mamba_ssm")]
    sys.modules["mamba_ssm"] = pkg
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    return mamba_chunk_scan_combined


def inputs(batch, length, nheads, headdim, d_state, ngroups, dtype=torch.bfloat16, seed=0, extras=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s, dt=dtype: torch.randn(*s, device="cuda", generator=g, dtype=dt)  # noqa: E731
    a = dict(x=r(batch, length, nheads, headdim), dt=torch.rand(batch, length, nheads, device="cuda", generator=g) * 0.1,
             A=-torch.rand(nheads, device="cuda", generator=g), B=r(batch, length, ngroups, d_state),
             C=r(batch, length, ngroups, d_state))
    if extras:
        a.update(D=r(nheads, dt=torch.float32), z=r(batch, length, nheads, headdim), dt_bias=r(nheads, dt=torch.float32) * 0.5)
    return a


def _zoo(a, **kw):
    return lambda **t: ssd_scan(**t, impl="triton", dt_softplus="dt_bias" in a, **kw)


def _mamba(fn, a):
    def call(x, dt, A, B, C, D=None, z=None, dt_bias=None):
        return fn(x, dt, A, B, C, chunk_size=256, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_bias is not None)
    return call


def timed(call, a):
    from triton.testing import do_bench
    with torch.no_grad():
        fwd = do_bench(lambda: call(**a), rep=300, return_mode="median")
    leaves = {k: v.clone().requires_grad_(True) for k, v in a.items()}
    grad = torch.randn_like(call(**leaves))

    def step():
        for t in leaves.values():
            t.grad = None
        call(**leaves).backward(grad)
    both = do_bench(step, rep=300, return_mode="median")  # the median: steadier between runs than the mean
    for t in leaves.values():
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 1e9
    return {"fwd_ms": fwd, "fwdbwd_ms": both, "peak_extra_GB": peak}


def errors(call, a, **ref_kw):
    """Max |error| / max |reference| of the output and every gradient, against the float64 chunked form."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in a.items()}
    out = call(**leaves)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref_leaves = {k: v.detach().double().requires_grad_(True) for k, v in a.items()}
    ref = ssd_scan(**ref_leaves, impl="chunked", dt_softplus="dt_bias" in a, **ref_kw)
    ref.backward(grad.double())
    rel = lambda t, r: ((t.double() - r).abs().max() / r.abs().max()).item()  # noqa: E731
    res = {"out": rel(out, ref)}
    res.update({f"d{k}": rel(leaves[k].grad, ref_leaves[k].grad) for k in a})
    return res


SETTINGS = ("BLOCK_Q", "BWD_BLOCK_Q", "BWD_BLOCK_P", "WALK_BLOCK_P", "FWD_WARPS", "BWD_WARPS", "BWD_STAGES",
            "TARGET_PROGRAMS", "STATE_FP32", "SEGMENT_MEMORY", "STORE_UNGATED", "GATE_PREPASS", "DD_SEPARATE")
# The settings tried by --sweep: (BWD_WARPS, WALK_BLOCK_P, SEGMENT_MEMORY). Earlier sweeps
# (results/ssd_h200_sweep_*.log) tried backward chunks of 64 and 128, headdim blocks of 16 and 32 in the chunk
# kernel, and software-pipelining its loop over heads: none was more than 4% faster than the defaults.
SWEEP = [(8, None, 1.0), (8, 32, 1.0), (8, 16, 1.0), (8, None, 1.4)]


def settings() -> dict:
    return {k: getattr(ssd_fn, k) for k in SETTINGS}


def kernel_profile(call, a) -> dict:
    """GPU time per kernel name over one forward+backward (torch.profiler), milliseconds."""
    from torch.profiler import ProfilerActivity, profile
    leaves = {k: v.clone().requires_grad_(True) for k, v in a.items()}
    grad = torch.randn_like(call(**leaves))
    call(**leaves).backward(grad)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call(**leaves).backward(grad)
        torch.cuda.synchronize()
    times = {}
    for e in prof.key_averages():
        if e.device_time_total > 0:
            times[e.key[:60]] = round(e.device_time_total / 1e3, 4)
    return dict(sorted(times.items(), key=lambda kv: -kv[1])[:12])


def gated_variants(out: str) -> None:
    rows = []
    full = inputs(**SHAPE, extras=True)
    for name, keep in (("plain", ()), ("D", ("D",)), ("z", ("z",)), ("D+z", ("D", "z"))):
        a = {k: v for k, v in full.items() if k in ("x", "dt", "A", "B", "C") + keep}
        for warps, dd_separate in ((4, False), (8, False), (4, True)):
            if dd_separate and "D" not in keep:
                continue
            ssd_fn.BWD_WARPS, ssd_fn.DD_SEPARATE = warps, dd_separate
            row = {"case": name, "BWD_WARPS": warps, "DD_SEPARATE": dd_separate, **timed(_zoo(a), a)}
            row["chunk_kernel_ms"] = kernel_profile(_zoo(a), a).get("_bwd_chunk_kernel")
            print(json.dumps(row), flush=True)
            rows.append(row)
    json.dump({"command": " ".join(["python"] + sys.argv), "device": torch.cuda.get_device_name(), "shape": SHAPE,
               "rows": rows}, open(out, "w"), indent=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", default=".anchors", help="folder holding mamba-ssm's mamba_ssm/ package")
    ap.add_argument("--out", default="ssd.json")
    ap.add_argument("--sweep", action="store_true",
                    help="first time the zoo's backward settings at the reference shape and keep the fastest whose "
                         "peak memory is no more than mamba-ssm's for the rows")
    ap.add_argument("--gated-variants", action="store_true",
                    help="zoo only: fwd+bwd and the chunk kernel's time with D alone, z alone, both, at 4 / 8 backward "
                         "warps and with D's gradient by its own kernel, to find what makes the gated backward slow")
    args = ap.parse_args()
    if args.gated_variants:
        return gated_variants(args.out)
    res = {"command": " ".join(["python"] + sys.argv), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "shape": SHAPE, "dtype": "bfloat16", "rows": []}
    try:
        mamba = load_mamba_ssd(args.src)
    except Exception as e:  # noqa: BLE001 - the zoo's rows are still worth having
        mamba = None
        res["mamba_ssm_error"] = repr(e)[:400]
    small = dict(batch=2, length=1000, nheads=8, headdim=64, d_state=128, ngroups=2)
    a, s = inputs(**SHAPE), inputs(**small, seed=1)
    if args.sweep:
        limit = timed(_mamba(mamba, a), a)["peak_extra_GB"] if mamba is not None else float("inf")
        res["sweep"], best = [], None
        defaults = settings()
        for ssd_fn.BWD_WARPS, ssd_fn.WALK_BLOCK_P, ssd_fn.SEGMENT_MEMORY in SWEEP:
            row = settings()
            try:
                row.update(timed(_zoo(a), a))
                errs = errors(_zoo(s), s)
                row["dA_error"], row["max_error"] = errs["dA"], max(errs.values())
                if row["peak_extra_GB"] <= limit and (best is None or row["fwdbwd_ms"] < best["fwdbwd_ms"]):
                    best = row
            except Exception as e:  # noqa: BLE001 - e.g. out of shared memory for a setting
                row["error"] = repr(e)[:200]
            print(json.dumps(row), flush=True)
            res["sweep"].append(row)
        chosen = {k: best[k] for k in SETTINGS} if best is not None else defaults
        for k, v in chosen.items():
            setattr(ssd_fn, k, v)
    res["settings"] = settings()
    print("settings", res["settings"], flush=True)
    res["profile_fwdbwd_ms"] = kernel_profile(_zoo(a), a)
    print(json.dumps(res["profile_fwdbwd_ms"]), flush=True)
    for extras in (False, True):
        a = inputs(**SHAPE, extras=extras)
        s = inputs(**small, extras=extras, seed=1)
        name = "plain" if not extras else "D+z+dt_bias+softplus"
        row = {"case": name, "zoo": {**timed(_zoo(a), a), "error": errors(_zoo(s), s)}}
        if mamba is not None:
            row["mamba_ssm"] = {**timed(_mamba(mamba, a), a), "error": errors(_mamba(mamba, s), s)}
            row["speedup_fwd"] = row["mamba_ssm"]["fwd_ms"] / row["zoo"]["fwd_ms"]
            row["speedup_fwdbwd"] = row["mamba_ssm"]["fwdbwd_ms"] / row["zoo"]["fwdbwd_ms"]
        print(json.dumps(row), flush=True)
        res["rows"].append(row)
    # The gated case's backward with the ungated output recomputed instead of stored, and where its time goes.
    a, s = inputs(**SHAPE, extras=True), inputs(**small, extras=True, seed=1)
    res["profile_fwdbwd_ms_gated"] = kernel_profile(_zoo(a), a)
    print(json.dumps(res["profile_fwdbwd_ms_gated"]), flush=True)
    stored, ssd_fn.STORE_UNGATED = ssd_fn.STORE_UNGATED, False
    row = {"case": "D+z+dt_bias+softplus, dz recomputed (zoo only)", "zoo": {**timed(_zoo(a), a), "error": errors(_zoo(s), s)}}
    ssd_fn.STORE_UNGATED = stored
    print(json.dumps(row), flush=True)
    res["rows"].append(row)
    a, s = inputs(**SHAPE), inputs(**small, seed=1)
    for name, kw in (("reverse", dict(reverse=True)), ("negative_eigenvalues", dict(negative_eigenvalues=True))):
        row = {"case": name, "zoo": {**timed(_zoo(a, **kw), a), "error": errors(_zoo(s, **kw), s, **kw)}}
        print(json.dumps(row), flush=True)
        res["rows"].append(row)
    json.dump(res, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
