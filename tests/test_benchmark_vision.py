"""benchmarks/vision.py: a CPU smoke run of the script, and its mamba-ssm scan stand-ins checked for layout
by feeding them the zoo's own mamba-ssm-compatible selective_scan_fn (same outputs as the zoo path)."""
import json

import pytest
import torch
from benchmark_scripts import load_benchmark

import zoo
from zoo.core.selective_scan import selective_scan_fn

bench = load_benchmark("vision")


def test_cpu_quick_run_writes_json(tmp_path):
    out = tmp_path / "vision.json"
    assert bench.main(["--device", "cpu", "--quick", "--sizes", "32", "--batch", "1", "--warmup", "0", "--reps", "1",
                       "--models", "vim_tiny", "deit_tiny_patch16_224", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {(r["model"], r["mode"]): r for r in result["rows"]}
    assert set(rows) == {(m, mode) for m in ("vim_tiny", "deit_tiny_patch16_224") for mode in ("infer", "train")}
    assert all(r["status"] == "ok" and r["images_per_s"] > 0 for r in rows.values())
    assert rows[("vim_tiny", "infer")]["source"] == "zoo" and rows[("deit_tiny_patch16_224", "infer")]["source"] == "timm"
    assert result["mamba_ssm"]["available"] is False and result["mamba_ssm"]["note"]
    assert result["ratios"] == []


def test_graph_mode_on_cpu_is_a_recorded_error(tmp_path):
    out = tmp_path / "vision.json"
    bench.main(["--device", "cpu", "--sizes", "32", "--batch", "1", "--warmup", "0", "--reps", "1",
                "--modes", "infer_graph", "--models", "deit_tiny_patch16_224", "--out", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["status"] == "error" and "infer_graph needs CUDA, got device cpu" in row["error"]


def test_bad_model_name_is_an_error(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--models", "vim_tinyy"])
    assert "unknown models ['vim_tinyy']" in capsys.readouterr().err


@pytest.mark.parametrize("name, kwargs, size", [
    ("vim_tiny", dict(embed_dim=16, depth=2, patch_size=8, stride=8, img_size=24), 24),
    ("vmamba_tiny", dict(dims=8, depths=(1, 1, 1, 1)), 36),
    ("efficient_vmamba_tiny", dict(dims=8, depths=(1, 1, 1, 1)), 36),
])
def test_mamba_ssm_stand_ins_keep_the_layout(name, kwargs, size):
    torch.manual_seed(0)
    model = zoo.create_model(name, num_classes=3, **kwargs).eval()
    x = torch.randn(2, 3, size, size)
    calls = []

    def counted(*args):
        calls.append(args[0].shape)  # u in mamba-ssm's (batch, dim, length) layout
        return selective_scan_fn(*args)

    with torch.no_grad():
        ref = model(x)
        with bench.mamba_ssm_scans(counted):
            swapped = model(x)
    assert calls and torch.allclose(ref, swapped, atol=1e-5)
