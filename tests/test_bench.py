"""`zoo bench` at the tiny budget: the JSON and Markdown agree, and the metrics are the tasks' own evaluations
(each is recomputed here by calling the task directly with the settings the row records)."""
import importlib.util
import json
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

needs_sklearn = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="digits needs scikit-learn")

TINY_VIM = dict(img_size=16, patch_size=4, stride=4, depth=1, embed_dim=32, num_classes=10)
MEAN_STD = (0.5, 0.5, 0.5)

# Runs in a fresh interpreter so the test's extra entry does not stay in the registry: it registers
# `vim_benchtest` as a vision entry with a pretrained tag whose weights are a local file (as our own package-data
# weights are), then runs `zoo bench` through the command line.
SCRIPT = textwrap.dedent("""
    import sys
    from zoo.cli import main
    from zoo.models.vision.vim import VisionMamba
    from zoo.registry import build_model, register_model, register_pretrained_cfgs

    def vim_benchtest(pretrained=False, **kwargs):
        return build_model(VisionMamba, "vim_benchtest", pretrained, **{**%(kwargs)r, **kwargs})

    vim_benchtest.__module__ = "zoo.models.vision.vim"  # a vision entry, as if defined in zoo/models/vision
    register_pretrained_cfgs({"vim_benchtest.digits": dict(file=sys.argv[1], num_classes=10, input_size=(3, 16, 16),
                                                           mean=%(mean)r, std=%(mean)r)})
    register_model(vim_benchtest)
    sys.exit(main(sys.argv[2:]))
""") % dict(kwargs=TINY_VIM, mean=MEAN_STD)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    from safetensors.torch import save_file

    from zoo.models.vision.vim import VisionMamba

    tmp = tmp_path_factory.mktemp("bench")
    torch.manual_seed(123)
    weights = tmp / "vim_benchtest_digits.safetensors"
    save_file({k: v.contiguous() for k, v in VisionMamba(**TINY_VIM).state_dict().items()}, str(weights))
    out = tmp / "out"
    argv = ["bench", "--models", "abmil", "vim_small_stride8", "vim_benchtest.*", "mambamil_survival", "--budget", "tiny",
            "--threads", "1", "--output", str(out), "--no-progress"]
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(weights), *argv], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "bench.json").read_text())
    return result, (out / "bench.md").read_text(), weights, argv


@needs_sklearn
def test_bench_rows_and_markdown_agree(bench):
    result, md, _, argv = bench
    rows = {r["model"]: r for r in result["rows"]}
    # Other rows may join: our own tagged weights of a selected entry are evaluated too.
    assert {"abmil", "mambamil_survival", "vim_benchtest.digits", "vim_small_stride8"} <= set(rows)
    assert result["command"] == "zoo " + shlex.join(argv)
    assert rows["mambamil_survival"]["status"] == "skipped" and "no task" in rows["mambamil_survival"]["error"]
    for name in ("abmil", "vim_small_stride8", "vim_benchtest.digits"):
        r = rows[name]
        assert r["status"] == "ok", r.get("traceback")
        assert r["flops"] > 0 and r["params"] > 0 and r["throughput"]["samples_per_s"] > 0
        assert r["peak_memory_bytes"] is None or r["peak_memory_bytes"] >= 0
        line = next(line for line in md.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] == r["task"] and cells[2] == "ok" and cells[3].split()[0] == r["metric"]["name"]
        assert float(cells[4]) == pytest.approx(r["metric"]["value"], abs=5e-5)
        assert int(cells[5].replace(",", "")) == r["params"]
        assert float(cells[7].replace(",", "")) == pytest.approx(r["flops"] / 1e6, abs=0.051)
    assert rows["vim_small_stride8"]["budget"] == "tiny" and rows["vim_small_stride8"]["train"]["limit_train_batches"] == 2
    assert rows["vim_benchtest.digits"]["budget"] == "pretrained" and rows["vim_benchtest.digits"]["train"]["trained"] is False
    assert re.search(r"\| mambamil_survival \| none \| skipped \|", md)


@needs_sklearn
def test_bench_metrics_are_the_tasks_evaluations(bench):
    result, _, weights, _ = bench
    rows = {r["model"]: r for r in result["rows"]}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the bench ran (and far faster than 2 threads on a busy 2-core machine)
    try:
        _check_direct(rows, weights)
    finally:
        torch.set_num_threads(threads)


def _check_direct(rows, weights):
    import zoo
    from zoo.data import create_dataset
    from zoo.data.digit_bags import make_digit_bags
    from zoo.hub import load_checkpoint
    from zoo.models.vision.vim import VisionMamba
    from zoo.tasks.classification import FinetuneConfig, evaluate, finetune
    from zoo.tasks.mil import evaluate_mil, train_mil

    # MIL: the same bags, seed, model and schedule as the row says -> the same accuracy and AUC.
    r = rows["abmil"]
    tr_x, tr_y = make_digit_bags(r["train"]["train_bags"], "train", seed=0)
    te_x, te_y = make_digit_bags(r["metrics"]["test_bags"], "test", seed=0)
    torch.manual_seed(0)
    model = zoo.create_model("abmil", **r["model_kwargs"])
    train_mil(model, tr_x, tr_y, r["train"]["epochs"], r["train"]["lr"], r["train"]["weight_decay"],
              r["train"]["bags_per_step"], 0)
    direct = evaluate_mil(model, te_x, te_y)
    assert r["metric"]["value"] == pytest.approx(direct["accuracy"], abs=1e-6)
    assert r["metrics"]["auc"] == pytest.approx(direct["auc"], abs=1e-6)

    # Classification: `zoo finetune`'s function with the row's settings.
    r = rows["vim_small_stride8"]
    kw = dict(r["model_kwargs"])
    cfg = FinetuneConfig(model="vim_small_stride8", epochs=r["train"]["epochs"], batch_size=r["train"]["batch_size"],
                         limit_train_batches=r["train"]["limit_train_batches"], img_size=kw.pop("img_size"),
                         patch_size=kw.pop("patch_size"), depth=kw.pop("depth"), progress=False,
                         model_kwargs={"embed_dim": kw["embed_dim"]})
    direct = finetune(cfg)
    assert direct["model_kwargs"] == r["model_kwargs"]
    assert r["metric"]["value"] == pytest.approx(direct["accuracy"], abs=1e-9)

    # Our own weights: evaluated as they are on the digits test split.
    r = rows["vim_benchtest.digits"]
    model = VisionMamba(**TINY_VIM)
    model.load_state_dict(load_checkpoint(weights))
    test = create_dataset("digits", "test", img_size=16, mean=MEAN_STD, std=MEAN_STD, seed=0)
    direct = evaluate(model, torch.utils.data.DataLoader(test, batch_size=128), torch.device("cpu"))
    assert r["metric"]["value"] == pytest.approx(direct["accuracy"], abs=1e-9)
    assert r["metrics"]["test_images"] == 360


def test_bench_entry_records_errors(monkeypatch):
    from zoo.tasks import bench

    def boom(*args):
        raise RuntimeError("task exploded")

    monkeypatch.setitem(bench.RUNNERS, "mil", boom)
    row = bench.bench_entry("abmil", "tiny")
    assert row["status"] == "error" and row["error"] == "RuntimeError: task exploded"
    assert bench.bench_entry("pointmamba_mpm", "tiny")["status"] == "skipped"
    assert bench.task_of("vim_tiny") == "classification" and bench.task_of("smamba_etth1") == "forecasting"
    with pytest.raises(ValueError, match="budget"):
        bench.run_bench(["abmil"], budget="huge")
