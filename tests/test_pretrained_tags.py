"""The tags trained here and shipped as package data: offline, strict, checksummed loading; the recorded
outputs on fixed inputs; the recorded test metric where re-measuring it is cheap."""
import json
import shutil
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest
import timm
import torch

import zoo
from zoo import registry
from zoo.hub import CheckpointError, resolve_pretrained_file
from zoo.tasks.pretrained import SHIPPED, evaluate_pretrained, reference_outputs

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
# The shipped tags: those with a committed evaluation of their packaged weights.
TAGS = [t for t in SHIPPED if (RESULTS / f"pretrained_{t}.json").exists()]
# Re-measuring the test metric takes seconds for these (the speech corpus needs espeak-ng and minutes).
CHEAP = {"vim_tiny.digits", "pointmamba_tiny.shapes3d", "mambamil.digit_bags", "smamba_classifier.basicmotions"}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    # Any attempt to reach the network fails: the packaged file must be enough.
    monkeypatch.setenv("ZOO_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_download(*args, **kwargs):
        raise AssertionError("a shipped tag tried to download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)


def _recorded(tag):
    return json.loads((RESULTS / f"pretrained_{tag}.json").read_text())


def test_every_modality_ships_a_tag():
    assert {"vim_tiny.digits", "pointmamba_tiny.shapes3d", "mambamil.digit_bags", "mamba_kws_tiny.kws"} <= set(TAGS)
    listed = zoo.list_models(pretrained=True)
    assert set(TAGS) <= set(listed)


@pytest.mark.parametrize("tag", TAGS)
def test_loads_offline_strict_and_reproduces_reference_outputs(tag):
    recorded = _recorded(tag)
    model = zoo.create_model(tag, pretrained=True)  # strict by default: every key present, every shape right
    cfg = model.pretrained_cfg
    assert cfg["tag"] == tag.split(".")[1] and cfg["file"] == f"weights/{tag}.safetensors"
    assert resolve_pretrained_file(cfg["file"]).is_file()
    assert sum(p.numel() for p in model.parameters()) == recorded["params"]
    assert all(p.dtype == torch.float32 for p in model.parameters())  # float16 file, float32 model
    torch.testing.assert_close(torch.tensor(reference_outputs(model, tag)), torch.tensor(recorded["reference_outputs"]),
                               atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("tag", sorted(CHEAP & set(TAGS)))
def test_reproduces_recorded_test_metric(tag):
    recorded = _recorded(tag)
    metric = recorded["metric"]
    fresh = evaluate_pretrained(tag)
    # Same weights, same data: the same predictions up to float rounding under another thread count (one sample).
    assert abs(fresh[metric] - recorded[metric]) <= 1.0 / recorded["test_samples"] + 1e-9
    assert fresh["test_samples"] == recorded["test_samples"]


def test_tag_model_kwargs_apply_only_to_the_tag():
    digits = zoo.model_info("vim_tiny.digits")
    assert digits["pretrained_cfgs"]["vim_tiny.digits"]["model_kwargs"]["depth"] == 6
    with torch.device("meta"):
        tagged = zoo.create_model("vim_tiny.digits")
        bare = zoo.create_model("vim_tiny")
        wider = zoo.create_model("vim_tiny.digits", num_classes=3)  # caller's kwargs win over the tag's
        via_timm = timm.create_model("vim_tiny.digits")
    assert len(tagged.layers) == 6 and tagged.head.out_features == 10 and len(bare.layers) == 24
    assert wider.head.out_features == 3 and len(via_timm.layers) == 6
    assert digits["num_params"] == sum(p.numel() for p in tagged.parameters())


def test_checksum_mismatch_and_corrupt_file_raise(tmp_path):
    tag = "mambamil.digit_bags"
    arch, t = registry.split_model_name(tag)
    cfg = dict(registry._pretrained_cfgs[arch][t])
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        zoo.create_model(arch, pretrained=True, pretrained_cfg={**cfg, "sha256": "0" * 64})
    corrupt = tmp_path / "corrupt.safetensors"
    shutil.copy(resolve_pretrained_file(cfg["file"]), corrupt)
    data = bytearray(corrupt.read_bytes())
    data[-1] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        zoo.create_model(arch, pretrained=True, pretrained_cfg={**cfg, "file": str(corrupt)})


def test_weights_are_package_data():
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["zoo"]
    files = [cfg["file"] for tags in registry._pretrained_cfgs.values() for cfg in tags.values() if cfg.get("file")]
    assert files and all(any(fnmatch(f, p) for p in patterns) for f in files)
    total = sum(resolve_pretrained_file(f).stat().st_size for f in files)
    # the two byte-level KJV LMs are 7 MB each (3.5M parameters in float16); the rest together about 6 MB
    assert total < 25e6, f"shipped weights should stay a few MB, got {total / 1e6:.1f} MB"


@pytest.mark.parametrize("tag", TAGS)
def test_recipe_is_the_recorded_training_command(tag):
    from zoo.tasks.pretrained import RECIPES, load_recipe

    recipe = load_recipe(RECIPES / f"{tag}.yaml")
    assert recipe["name"] == tag
    assert json.loads((REPO / recipe["train_result"]).read_text())["command"] == recipe["train"]
    assert recipe["evaluate"] == _recorded(tag)["command"]
    arch, t = registry.split_model_name(tag)
    assert (recipe["model_kwargs"] or {}) == (registry._pretrained_cfgs[arch][t].get("model_kwargs") or {})


def _run_cli(argv):
    import argparse
    import importlib

    module = importlib.import_module(f"zoo.tasks.{argv[0]}")
    parser = argparse.ArgumentParser()
    module.add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv[1:])
    args.command_line = "zoo " + " ".join(argv[1:])
    return args.func(args)


def test_task_save_weights_reload_into_the_tag(tmp_path):
    """Each task's --save-weights writes a state dict that loads strictly into the shipped tag's architecture."""
    w = tmp_path / "points.safetensors"
    assert _run_cli(["point_classification", "points", "bench", "--models", "pointmamba", "--epochs", "1",
                     "--train-per-class", "2", "--test-per-class", "1", "--num-points", "512", "--batch-size", "8",
                     "--save-weights", str(w)]) == 0
    zoo.create_model("pointmamba_tiny.shapes3d", checkpoint_path=str(w))
    w = tmp_path / "mil.safetensors"
    assert _run_cli(["mil", "mil", "bench", "--models", "mambamil", "--seeds", "0", "--epochs", "1", "--train-bags", "4",
                     "--test-bags", "4", "--save-weights", str(w)]) == 0
    zoo.create_model("mambamil.digit_bags", checkpoint_path=str(w))
    w = tmp_path / "tsc.safetensors"
    assert _run_cli(["ts_classification", "tsc", "bench", "--seeds", "0", "--epochs", "1", "--quiet",
                     "--save-weights", str(w)]) == 0
    zoo.create_model("smamba_classifier.basicmotions", checkpoint_path=str(w))
    with pytest.raises(ValueError, match="--save-weights needs one model and one seed"):
        _run_cli(["mil", "mil", "bench", "--seeds", "0", "1", "--save-weights", str(w)])
