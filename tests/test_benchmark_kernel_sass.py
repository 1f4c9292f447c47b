"""benchmarks/kernel_sass.py: compiles a scan kernel for sm_90 without a GPU and reads its SASS (in a
subprocess: the test session runs Triton in interpreter mode)."""
import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_sass.py"


def _run(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=600)


def test_forward_kernel_static_profile(tmp_path):
    out = tmp_path / "sass.json"
    proc = _run("--tiles", "fwd:4:8:1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["kernel"] == "fwd" and 0 < row["registers"] <= 255
    # It exponentiates every element; its only reduction is over states (y = sum_n h C).
    assert row["mufu"] > 0 and row["fp"] > 0 and row["sass_total"] > row["fp"]


def test_bad_tile_is_an_error():
    proc = _run("--tiles", "sideways:8:8:1")
    assert proc.returncode == 2 and "kernel must be fwd or bwd, got 'sideways'" in proc.stderr
