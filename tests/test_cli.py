"""The `zoo` command line and the main job (fine-tune + evaluate on digits) at a tiny size."""
import contextlib
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader

import zoo
from zoo.cli import main
from zoo.data import DigitsDataset, create_dataset
from zoo.tasks.classification import cosine_with_warmup, evaluate, param_groups_weight_decay

needs_sklearn = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="digits needs scikit-learn (the data extra)")

# A 1-block, 32-wide Vim on 16x16 digits (4x4 patches): the whole job runs in seconds on CPU.
TINY = ["--epochs", "1", "--limit-train-batches", "2", "--batch-size", "16", "--img-size", "16", "--patch-size", "4",
        "--depth", "1", "--model-kwargs", "embed_dim=32", "--no-progress"]


def run_cli(argv, capsys):
    """(exit code, stdout, stderr) of `zoo <argv>` run in this process."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse exits for usage errors and --help
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def tiny_job(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("finetune")
    # Module-scoped (the job runs once for several tests), so capsys is not available: redirect by hand.
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["finetune", *TINY, "--output", str(out_dir)])
    return code, stdout.getvalue(), stderr.getvalue(), out_dir


@needs_sklearn
def test_finetune_tiny_job_end_to_end(tiny_job):
    code, out, err, out_dir = tiny_job
    assert code == 0, err
    assert "trained from scratch" in out  # the job says where its weights came from
    printed = re.search(r"top-1 accuracy: ([0-9.]+) on (\d+) digits test images", out)
    assert printed, out
    assert re.search(r"images/s: train [0-9.]+, eval [0-9.]+", out), out

    result = json.loads((out_dir / "result.json").read_text())
    assert 0.0 <= result["accuracy"] <= 1.0
    assert float(printed.group(1)) == pytest.approx(result["accuracy"], abs=5e-5)
    assert result["test_images"] == int(printed.group(2)) == 360
    assert result["train_images_per_s"] > 0 and result["eval_images_per_s"] > 0 and result["wall_seconds"] > 0
    assert result["history"][0]["epoch"] == 1 and len(result["history"]) == 1
    assert result["model_kwargs"]["depth"] == 1 and result["model_kwargs"]["embed_dim"] == 32


@needs_sklearn
def test_finetune_checkpoint_reloads_and_reproduces_accuracy(tiny_job):
    """The checkpoint loads strictly through create_model(checkpoint_path=...) and the reloaded model
    scores exactly the accuracy the job reported: the number was computed, by that model."""
    _, _, _, out_dir = tiny_job
    result = json.loads((out_dir / "result.json").read_text())
    model = zoo.create_model(result["model"], checkpoint_path=result["checkpoint"], **result["model_kwargs"])
    assert sum(p.numel() for p in model.parameters()) == result["params"]
    cfg = model.pretrained_cfg
    test_set = create_dataset("digits", "test", img_size=16, mean=cfg["mean"], std=cfg["std"])
    ev = evaluate(model, DataLoader(test_set, batch_size=128), torch.device("cpu"))
    assert ev["accuracy"] == pytest.approx(result["accuracy"], abs=1e-9)


@needs_sklearn
@pytest.mark.parametrize("model", ["vmamba_tiny", "efficient_vmamba_tiny"])
def test_finetune_hierarchical_entry(model, tmp_path, capsys):
    """The job's Vim-style size defaults (image size, patch 8, depth 6) are not forced on entries that size
    themselves to the input: they build with their own stem and train end to end."""
    argv = ["finetune", "--model", model, "--epochs", "1", "--limit-train-batches", "1", "--batch-size", "8",
            "--img-size", "32", "--model-kwargs", "depths=(1,1,1,1)", "dims=16", "--no-progress", "--output", str(tmp_path)]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    kwargs = json.loads((tmp_path / "result.json").read_text())["model_kwargs"]
    assert kwargs == {"num_classes": 10, "drop_path_rate": 0.0, "depths": [1, 1, 1, 1], "dims": 16}


def test_list_and_info(capsys):
    code, out, _ = run_cli(["list", "vim*"], capsys)
    assert code == 0 and "vim_tiny" in out.split() and "vim_small" in out.split()
    code, out, _ = run_cli(["list", "vim_tiny*", "--pretrained"], capsys)
    assert code == 0 and "vim_tiny.in1k" in out.split()
    code, out, _ = run_cli(["info", "vim_tiny"], capsys)
    assert code == 0 and "architecture: vim_tiny" in out and "hustvl/Vim-tiny-midclstok" in out
    code, out, _ = run_cli(["info", "vim-tiny", "--json"], capsys)
    assert code == 0 and json.loads(out)["architecture"] == "vim_tiny"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["finetune", "--model", "vim_tinyy", *TINY], r"unknown model 'vim_tinyy'.*closest.*vim_tiny"),
        (["finetune", "--data", "mnist", *TINY], r"unknown dataset 'mnist'; expected one of: digits"),
        (["finetune", "--model-kwargs", "embed_dim", *TINY[:-3]], r"expected key=value, got 'embed_dim'"),
        (["info", "nope_net"], r"unknown model 'nope_net'"),
        (["list", "nothing*"], r"no model matches 'nothing\*'"),
    ],
)
def test_bad_arguments_exit_with_a_clear_message(argv, message, capsys):
    code, _, err = run_cli(argv, capsys)
    assert code != 0
    assert re.search(message, err), err


def test_unknown_subcommand_is_a_usage_error(capsys):
    code, _, err = run_cli(["train"], capsys)
    assert code == 2 and "invalid choice: 'train'" in err


def test_python_dash_m_zoo_and_console_script():
    proc = subprocess.run([sys.executable, "-m", "zoo", "list", "vim_t*"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "vim_tiny" in proc.stdout.split()
    # The script lands beside the interpreter of the environment the package was installed into.
    script = shutil.which("zoo", path=os.path.dirname(sys.executable)) or shutil.which("zoo")
    if script is None:
        if os.environ.get("CI"):  # .ci/run installs the package: the script must be there
            pytest.fail("the `zoo` console script is not installed; CI installs it with pip install -e .")
        pytest.skip("the `zoo` console script is not installed (pip install -e .)")
    proc = subprocess.run([script, "finetune", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--limit-train-batches" in proc.stdout


@needs_sklearn
def test_digits_split_is_stratified_fixed_and_normalised():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    train = DigitsDataset("train", img_size=24, mean=mean, std=std)
    test = DigitsDataset("test", img_size=24, mean=mean, std=std)
    assert len(train) + len(test) == 1797 and len(test) == 360
    assert torch.bincount(test.labels, minlength=10).tolist() == torch.bincount(
        DigitsDataset("test", img_size=8).labels, minlength=10).tolist()  # same split at any size
    assert torch.bincount(test.labels).min() >= 35  # stratified: every class holds ~1/5 of its images
    img, label = test[0]
    assert img.shape == (3, 24, 24) and img.dtype == torch.float32 and 0 <= int(label) < 10
    # The corner pixel of a scan is background (0): it becomes -mean / std per channel.
    expected = torch.tensor([-m / s for m, s in zip(mean, std)])
    assert torch.allclose(test.images[:, :, 0, 0], expected.expand(len(test), 3), atol=1e-5)
    assert test.augment is False and train.augment is True
    assert torch.equal(test[5][0], test[5][0])  # no randomness at eval
    torch.manual_seed(0)
    assert not torch.equal(train[5][0], train.images[5])  # augmentation changes training images


def test_digits_needs_scikit_learn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # makes `import sklearn...` raise ImportError
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'mamba-zoo\[data\]'"):
        DigitsDataset("test")


def test_weight_decay_groups_and_schedule():
    model = zoo.create_model("vim_tiny", num_classes=10, img_size=16, patch_size=4, stride=4, depth=1, embed_dim=32)
    decay, no_decay = param_groups_weight_decay(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert {"pos_embed", "cls_token", "head.bias", "norm_f.weight"} <= no_decay_names
    assert "head.weight" not in no_decay_names and decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"])

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = cosine_with_warmup(opt, total_steps=10, warmup_steps=2, min_lr=1e-5)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(5e-4) and lrs[1] == pytest.approx(1e-3)  # linear warmup reaches the peak
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))  # then decays monotonically
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-5)  # to min_lr after the last step
