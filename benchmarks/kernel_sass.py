"""Static profile of the selective-scan kernels for sm_90, without a GPU: registers, spills, and the
SASS instruction mix (warp shuffles, float ops, special-function ops, shared-memory traffic) of one
compiled variant, plus the layout conversions left in its Triton GPU IR. What it counts is static (the
kernel's code, not executed instructions) but the chunk loop dominates it, so changes that remove
per-chunk work show here before any device time is spent.

    python benchmarks/kernel_sass.py [--kernels FILE] [--tiles bwd:8:8:1 fwd:8:16:1 ...] [--out FILE]

``--kernels`` compiles another version of zoo/kernels/selective_scan/kernels.py (e.g. one taken with
``git show REV:zoo/kernels/selective_scan/kernels.py``). Needs triton's bundled ptxas and cuobjdump.
Variant compiled: bf16 u/delta/B/C/z, D, z gate, delta_bias + softplus, d_state 16, one sequence per
program, unit channel strides (as the launchers specialise them).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

REPO = Path(__file__).resolve().parents[1]
KERNELS = REPO / "zoo" / "kernels" / "selective_scan" / "kernels.py"
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
UNIT_STRIDES = {"s_ud", "s_dd", "s_Bn", "s_Cn", "s_zd", "s_gd", "s_An", "s_od"}  # Triton specialises ints equal to 1
BF16_PTRS = {"u_ptr", "dt_ptr", "B_ptr", "C_ptr", "z_ptr", "dout_ptr", "du_ptr", "ddt_ptr", "dz_ptr", "out_ptr"}
FP_OPS = ("FFMA", "FMUL", "FADD", "FSEL", "FSETP", "FMNMX")


def load_kernels(path: Path):
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("kernel_sass: TRITON_INTERPRET=1 is set; the kernels must be compiled, not interpreted: unset it")
    spec = importlib.util.spec_from_file_location("scan_kernels_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compile_variant(module, which: str, block_t: int, block_d: int, warps: int) -> dict:
    fn = module._bwd_kernel if which == "bwd" else module._fwd_kernel
    const = dict(BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_N=16, HAS_D=True, HAS_Z=True, HAS_DTB=True, SOFTPLUS=True,
                 HAS_CU=False, HAS_T=False)
    const.update(dict(HAS_DLAST=False, DETERMINISTIC=False, ADJ_ONLY=False) if which == "bwd"
                 else dict(HAS_H0=False, SAVE=True, STORE_OUT=True))
    signature = {}
    for name in fn.arg_names:
        if name in const:
            signature[name] = "constexpr"
        elif name in UNIT_STRIDES:
            signature[name], const[name] = "constexpr", 1
        elif name == "flags_ptr":
            signature[name] = "*i32"
        elif name in ("cu_ptr", "cs_ptr"):
            signature[name] = "*i64"
        elif name.endswith("_ptr"):
            signature[name] = "*bf16" if name in BF16_PTRS else "*fp32"
        else:
            signature[name] = "i32"
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=const),
                              target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        ptx.write_text(compiled.asm["ptx"])
        log = subprocess.run([str(BIN / "ptxas"), "-v", "--gpu-name", "sm_90a", str(ptx), "-o", str(cubin)],
                             capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([str(BIN / "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    ops = Counter(re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass))
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return dict(kernel=which, block_t=block_t, block_d=block_d, num_warps=warps,
                registers=int(re.search(r"Used (\d+) registers", log).group(1)),
                spill_store_bytes=int(spill.group(1)) if spill else 0, spill_load_bytes=int(spill.group(2)) if spill else 0,
                sass_total=sum(ops.values()), shfl=ops["SHFL"], fp=sum(ops[o] for o in FP_OPS), mufu=ops["MUFU"],
                sts=ops["STS"], lds=ops["LDS"], ldg=ops["LDG"],
                convert_layout=compiled.asm["ttgir"].count("ttg.convert_layout"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kernels", type=Path, default=KERNELS, help="the kernels.py to compile")
    p.add_argument("--tiles", nargs="+", default=["fwd:8:16:1", "fwd:8:8:1", "bwd:8:8:1", "bwd:4:8:1"],
                   metavar="KERNEL:T:D:WARPS")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    module = load_kernels(args.kernels)
    rows = []
    for tile in args.tiles:
        which, t, d, w = tile.split(":")
        if which not in ("fwd", "bwd"):
            p.error(f"--tiles: kernel must be fwd or bwd, got {which!r} in {tile!r}")
        rows.append(compile_variant(module, which, int(t), int(d), int(w)))
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(dict(
            command="python benchmarks/kernel_sass.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            kernels=str(args.kernels.relative_to(REPO)) if args.kernels.is_relative_to(REPO) else str(args.kernels),
            triton=triton.__version__, target="sm_90a", rows=rows), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
