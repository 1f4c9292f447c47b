"""Issue 20, items 1, 3 and 5: numeric arguments refused with a message naming the argument, the value and
what is allowed; outputs checked before the first step, never overwritten silently and written as one
consistent set through temporary files; expected failures reported as messages, not tracebacks."""
import argparse
import hashlib
import importlib.util
import json
import re
import tempfile

import pytest
import torch

import zoo
from zoo.cli import main
from zoo.core import BiMamba, Mamba
from zoo.tasks.classification import FinetuneConfig, finetune
from zoo.tasks.engine import read_training_state

needs_sklearn = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="digits needs scikit-learn (the data extra)")

# A 1-block, 32-wide Vim on 16x16 digits: the whole job runs in a few seconds on CPU.
TINY = ["--epochs", "1", "--limit-train-batches", "2", "--batch-size", "16", "--img-size", "16", "--patch-size", "4",
        "--depth", "1", "--model-kwargs", "embed_dim=32", "--no-progress"]
TINY_VIM = dict(img_size=16, patch_size=4, stride=4, depth=1, embed_dim=32)


def run_cli(argv, capsys):
    """(exit code, stdout, stderr) of `zoo <argv>` run in this process."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------ 1. numeric arguments

@pytest.mark.parametrize("argv, message", [
    (["finetune", *TINY, "--limit-train-batches", "-1"], "argument --limit-train-batches: must be an integer >= 1, got -1"),
    (["finetune", *TINY, "--limit-train-batches", "0"], "argument --limit-train-batches: must be an integer >= 1, got 0"),
    (["finetune", *TINY, "--lr", "0"], "argument --lr: must be a number > 0, got 0.0"),
    (["finetune", *TINY, "--ema-decay", "1"], r"argument --ema-decay: must be a number in \[0, 1\), got 1.0"),
    (["dynamics", "vim_tiny", "--batch", "0", "--set", "img_size=16", "patch_size=4", "stride=4", "depth=1", "embed_dim=32"],
     "argument --batch: must be an integer >= 1, got 0"),
    (["forecast", "bench", "--epochs", "0"], "argument --epochs: must be an integer >= 1, got 0"),
    (["segment", "--batch-size", "-2"], "argument --batch-size: must be an integer >= 1, got -2"),
    (["mil", "bench", "--epochs", "0"], "argument --epochs: must be an integer >= 1, got 0"),
    (["mil", "bench", "--bag-size", "0", "5"], "argument --bag-size: must be an integer >= 1, got 0"),
    (["mil", "bench", "--lr=-1e-3"], "argument --lr: must be a number > 0, got -0.001"),
    (["mil", "extract", "a.svs", "--out", "x", "--min-tissue", "1.5"], r"argument --min-tissue: must be a number in \[0, 1\], got 1.5"),
    (["speech", "--batch-size", "0"], "argument --batch-size: must be an integer >= 1, got 0"),
    (["speech", "--limit-batches", "-3"], "argument --limit-batches: must be an integer >= 1, got -3"),
])
def test_cli_refuses_numbers_out_of_range(argv, message, capsys):
    code, out, err = run_cli(argv, capsys)
    assert code == 2, (out, err)
    assert re.search(message, err), err
    assert "nan" not in out and "top-1" not in out  # nothing ran


def test_finetune_api_checks_its_config():
    with pytest.raises(ValueError, match=r"finetune: limit_train_batches must be an integer >= 1 or None, got 0"):
        finetune(FinetuneConfig(limit_train_batches=0))
    with pytest.raises(ValueError, match=r"min_lr must be <= lr"):
        finetune(FinetuneConfig(lr=1e-4, min_lr=1e-3))


@pytest.mark.parametrize("name, kwargs, message", [
    ("vim_tiny", dict(depth=0), "VisionMamba: depth must be an integer >= 1, got 0"),
    ("vim_tiny", dict(num_classes=-1), "VisionMamba: num_classes must be an integer >= 0, got -1"),
    ("vim_tiny", dict(embed_dim=0), "VisionMamba: embed_dim must be an integer >= 1, got 0"),
    ("vmamba_tiny", dict(depths=(1, 0, 1, 1)), r"VMamba: depths must be .*integers >= 1, got \(1, 0, 1, 1\)"),
    ("vmamba_tiny", dict(num_classes=-1), "VMamba: num_classes must be an integer >= 0, got -1"),
    ("efficient_vmamba_tiny", dict(dims=0), "EfficientVMamba: dims must be an integer >= 1, got 0"),
    ("pointmamba_tiny", dict(depth=0), "PointMamba: depth must be an integer >= 1, got 0"),
    ("pcm_modelnet40", dict(num_classes=-1), "PointCloudMamba: num_classes must be an integer >= 0, got -1"),
    ("smamba", dict(e_layers=0), "S-Mamba: e_layers must be an integer >= 1, got 0"),
    ("mambamil", dict(depth=0), "MambaMIL: depth must be an integer >= 1, got 0"),
    ("abmil", dict(num_classes=-1), "ABMIL: num_classes must be an integer >= 0, got -1"),
    ("mamba_kws_tiny", dict(depth=0), "MambaSpeechEncoder: depth must be an integer >= 1, got 0"),
    ("vim_tiny", dict(d_state="abc"), r"d_state must be an integer >= 1, got 'abc' \(str\)"),
    ("vim_tiny", dict(drop_path_rate=1.5), r"drop_path_rate must be a number in \[0, 1\), got 1.5"),
])
def test_model_builders_refuse_bad_sizes(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        with torch.device("meta"):  # the check comes first: nothing is allocated
            zoo.create_model(name, **kwargs)


def test_core_mixer_checks_its_sizes():
    with pytest.raises(ValueError, match="Mamba: d_state must be an integer >= 1, got 0"):
        Mamba(8, d_state=0)
    with pytest.raises(ValueError, match="BiMamba: expand must be a number > 0, got 0"):
        BiMamba(8, expand=0)


# ------------------------------------------------------------------------------------------ 3. outputs

def test_output_that_is_a_file_is_refused_before_training(tmp_path, capsys):
    target = tmp_path / "result"
    target.write_text("not a folder")
    code, out, err = run_cli(["finetune", *TINY, "--output", str(target)], capsys)
    assert code == 2 and f"--output {target}: expected a folder, got an existing file" in err, err
    assert "finetune vim_tiny" not in out  # refused before the model was built


def test_mil_and_speech_refuse_bad_values_and_outputs_before_any_work(tmp_path):
    from zoo.tasks.mil import run_mil_benchmark
    from zoo.tasks.speech import run_speech_task

    with pytest.raises(ValueError, match=r"mil bench: bag_size must be \(min, max\) integers with 1 <= min <= max, got \(9, 4\)"):
        run_mil_benchmark(["abmil"], [0], bag_size=(9, 4))
    with pytest.raises(ValueError, match="mil bench: seed must be an integer >= 0, got -1"):
        run_mil_benchmark(["abmil"], [-1])
    folder = tmp_path / "taken"
    folder.mkdir()
    with pytest.raises(ValueError, match="--output .*taken: expected a file name, got an existing folder"):
        run_mil_benchmark(["abmil"], [0], output=str(folder))
    with pytest.raises(ValueError, match="speech: epochs must be an integer >= 1, got 0"):
        run_speech_task("kws", epochs=0, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="--save-weights .*taken: expected a file name, got an existing folder"):
        run_speech_task("kws", cache_dir=str(tmp_path / "never-built"), save_weights=str(folder))
    assert not (tmp_path / "never-built").exists()  # refused before the corpus was synthesized


def test_unwritable_output_is_refused_before_training(tmp_path, capsys, monkeypatch):
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    real = tempfile.NamedTemporaryFile

    def refuse(*args, **kwargs):  # a read-only folder (chmod does not stop root, who runs these tests in CI)
        if str(kwargs.get("dir", "")).startswith(str(readonly)):
            raise PermissionError(13, "Permission denied")
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)
    code, out, err = run_cli(["finetune", *TINY, "--output", str(readonly / "run")], capsys)
    assert code == 2 and "expected a folder this process can write to" in err and "Permission denied" in err, err
    assert "finetune vim_tiny" not in out


@needs_sklearn
def test_earlier_run_is_kept_unless_overwrite_and_the_set_is_consistent(tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, _, err = run_cli(["finetune", *TINY, "--output", str(out_dir)], capsys)
    assert code == 0, err
    first = (out_dir / "model.safetensors").read_bytes()

    code, out, err = run_cli(["finetune", *TINY, "--seed", "1", "--output", str(out_dir)], capsys)
    assert code == 2 and "already holds model.safetensors, result.json of an earlier run; pass --overwrite" in err, err
    assert (out_dir / "model.safetensors").read_bytes() == first

    code, _, err = run_cli(["finetune", *TINY, "--seed", "1", "--output", str(out_dir), "--overwrite"], capsys)
    assert code == 0, err
    result = json.loads((out_dir / "result.json").read_text())
    model_bytes = (out_dir / "model.safetensors").read_bytes()
    assert model_bytes != first and result["config"]["seed"] == 1
    # The result names the model it was written with: its sha256 and a run id stored in both files.
    assert result["checkpoint_sha256"] == hashlib.sha256(model_bytes).hexdigest()
    from safetensors import safe_open

    with safe_open(str(out_dir / "model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["run_id"]) == result["run_id"]
    assert sorted(p.name for p in out_dir.iterdir()) == ["model.safetensors", "result.json"]  # no temporary files left


@needs_sklearn
def test_a_write_that_fails_leaves_no_partial_file_and_no_stale_result(tmp_path, capsys, monkeypatch):
    out_dir = tmp_path / "run"
    assert run_cli(["finetune", *TINY, "--output", str(out_dir)], capsys)[0] == 0
    first = (out_dir / "model.safetensors").read_bytes()
    import safetensors.torch

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="No space left"):
        main(["finetune", *TINY, "--seed", "1", "--output", str(out_dir), "--overwrite"])
    # The earlier model is intact (never half-written), and its result is gone rather than left beside another model.
    assert (out_dir / "model.safetensors").read_bytes() == first
    assert sorted(p.name for p in out_dir.iterdir()) == ["model.safetensors"]


# ---------------------------------------------------------------------------- 5. messages, not tracebacks

def test_unreachable_checkpoint_url_is_a_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("ZOO_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    code, _, err = run_cli(["finetune", *TINY, "--checkpoint-path", "http://127.0.0.1:9/weights.pth"], capsys)
    assert code == 2 and "could not download http://127.0.0.1:9/weights.pth: URLError" in err, err


@pytest.mark.parametrize("kwargs, message", [
    (["d_stat=4"], r"unexpected keyword argument 'd_stat'; VisionMamba takes .* \(closest: d_state"),
    (["d_state='abc'"], r"d_state must be an integer >= 1, got 'abc'"),
])
def test_bad_model_kwargs_are_a_message(kwargs, message, capsys):
    code, _, err = run_cli(["finetune", *TINY[:-3], "--model-kwargs", "embed_dim=32", *kwargs, "--no-progress"], capsys)
    assert code == 2 and re.search(message, err), err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_a_gpu_is_a_message(capsys):
    code, _, err = run_cli(["finetune", *TINY, "--device", "cuda"], capsys)
    assert code == 2 and "device 'cuda' requested, but torch.cuda.is_available() is False" in err, err


@pytest.mark.parametrize("name, kwargs, owner", [
    ("vim_tiny", TINY_VIM, "VisionMamba"),
    ("vmamba_tiny", dict(depths=(1, 1, 1, 1), dims=8), "VMamba"),
    ("efficient_vmamba_tiny", dict(depths=(1, 1, 1, 1), dims=8), "EfficientVMamba"),
])
def test_image_dtype_must_match_the_model(name, kwargs, owner):
    model = zoo.create_model(name, **kwargs).eval()
    images = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match=rf"{owner}: expected images of dtype torch.float32 .*, got torch.float64"):
        model(images.double())
    with pytest.raises(ValueError, match=rf"{owner}: expected images of dtype torch.float32 .*got torch.uint8 .*convert and normalise"):
        model((images * 255).clamp(0, 255).to(torch.uint8))
    assert model.double()(images.double()).dtype == torch.float64  # float64 models take float64 images


def test_tiny_image_into_efficient_vmamba_is_a_message():
    model = zoo.create_model("efficient_vmamba_tiny", depths=(1, 1, 1, 1), dims=8).eval()
    with pytest.raises(ValueError, match=r"EfficientVMamba: expected images of at least 4x4 pixels .*got 2x2"):
        model(torch.randn(1, 3, 2, 2))


@pytest.mark.parametrize("mixer", [Mamba, BiMamba])
def test_mixers_take_length_zero(mixer):
    assert mixer(8)(torch.randn(2, 0, 8)).shape == (2, 0, 8)


def test_refused_pickle_says_why_without_torchs_advice(tmp_path):
    path = tmp_path / "checkpoint-epoch1.pt"
    torch.save({"format": "zoo-training-state", "args": argparse.Namespace(lr=1e-3)}, path)
    with pytest.raises(ValueError) as info:
        read_training_state(path)
    message = str(info.value)
    assert "holds an object of type argparse.Namespace" in message and "arbitrary code" in message, message
    assert "weights_only=False" not in message and "Re-running" not in message, message
