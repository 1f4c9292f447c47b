"""Official checkpoints through the path users take.

For every family with official weights, a file is written in exactly the container layout and key names that
the official training code saves (read from that code; each case names the file and function), then loaded
strictly through ``zoo.create_model(name, checkpoint_path=...)`` and, where the entry registers a source,
through ``zoo.create_model(name, pretrained=True)`` from a local cache with offline mode on. The loaded model's
float64 forward must equal the forward of the weights the file was made from: the official forward restated in
the family's tests where one exists, else the model that the weights came from.

And every registered entry runs a float64 forward without rounding a float64 tensor down anywhere.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable

import huggingface_hub.constants
import pytest
import timm
import timm.scheduler
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from yacs.config import CfgNode  # a development dependency: the official VMamba files carry one

import zoo
from zoo import cards, hub
from zoo.models.mil import MambaMIL

from test_efficient_vmamba import TINY as EVM_TINY
from test_efficient_vmamba import official_forward as evm_official_forward
from test_efficient_vmamba import official_state_dict as evm_official_state_dict
from test_mil import _mambamil_ref, _perturb
from test_point_pcm import SMALL as PCM_TEST_SMALL
from test_point_pointmamba import _official_forward as pointmamba_official_forward
from test_smamba import TINY as SMAMBA_TINY
from test_smamba import _official_and_converted as smamba_official_and_converted
from test_smamba import official_forward as smamba_official_forward
from test_vim import official_forward as vim_official_forward
from test_vim import official_state_dict as vim_official_state_dict
from test_vmamba import TINY as VMAMBA_TINY
from test_vmamba import official_forward as vmamba_official_forward
from test_vmamba import official_state_dict as vmamba_official_state_dict


REVISION = "0123456789abcdef0123456789abcdef01234567"


# ---------------------------------------------------------------- what the official training scripts store


def _optimizer_state(state_dict: dict) -> dict:
    """A real optimizer state dict (AdamW after one step) over tensors shaped like the weights."""
    params = [torch.zeros_like(v, dtype=torch.float32, requires_grad=True) for v in state_dict.values() if v.is_floating_point()]
    opt = torch.optim.AdamW(params, lr=1e-3)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    return opt.state_dict()


def _timm_scheduler_state() -> dict:
    opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=1e-3)
    return timm.scheduler.CosineLRScheduler(opt, t_initial=300, warmup_t=5).state_dict()


def _scaler_state() -> dict:
    # torch.cuda.amp.GradScaler.state_dict() of an enabled scaler (timm's NativeScaler returns it).
    return {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000, "_growth_tracker": 0}


def _vmamba_config(name: str) -> Any:
    """A yacs CfgNode as classification/config.py builds it (a few of its nodes): VMamba's and EfficientVMamba's
    main.py store the run's config object itself next to the weights."""
    CN = CfgNode
    cfg = CN()
    cfg.MODEL = CN()
    cfg.MODEL.TYPE, cfg.MODEL.NAME, cfg.MODEL.NUM_CLASSES = "vssm", name, 1000
    cfg.MODEL.VSSM = CN()
    cfg.MODEL.VSSM.DEPTHS, cfg.MODEL.VSSM.EMBED_DIM, cfg.MODEL.VSSM.SSM_RATIO = [2, 2, 8, 2], 96, 1.0
    cfg.DATA = CN()
    cfg.DATA.IMG_SIZE, cfg.DATA.DATA_PATH = 224, "/dataset/ImageNet2012"
    cfg.TRAIN = CN()
    cfg.TRAIN.EPOCHS, cfg.TRAIN.BASE_LR = 300, 1e-3
    cfg.freeze()
    return cfg


def vim_container(sd: dict) -> dict:
    """hustvl/Vim vim/main.py, utils.save_on_master({...}, output_dir / 'checkpoint.pth')."""
    return {
        "model": sd,
        "optimizer": _optimizer_state(sd),
        "lr_scheduler": _timm_scheduler_state(),
        "epoch": 299,
        "model_ema": {k: v + 1 for k, v in sd.items()},  # get_state_dict(model_ema): must not be the one loaded
        "scaler": _scaler_state(),
        "args": argparse.Namespace(model="vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
                                   batch_size=128, epochs=300, input_size=224, lr=5e-4, model_ema=True, output_dir="./output"),
    }


def vmamba_container(sd: dict, name: str) -> dict:
    """MzeroMiko/VMamba classification/utils/utils.py save_checkpoint_ema (EfficientVMamba's main.py: the same
    function): model, optimizer, lr_scheduler, max_accuracy, scaler, epoch, the yacs config, and the EMA copy."""
    return {
        "model": sd,
        "optimizer": _optimizer_state(sd),
        "lr_scheduler": _timm_scheduler_state(),
        "max_accuracy": 82.5,
        "scaler": _scaler_state(),
        "epoch": 299,
        "config": _vmamba_config(name),
        "model_ema": {k: v + 1 for k, v in sd.items()},
        "max_accuray_ema": 82.6,  # sic, the official key
    }


def pointmamba_container(sd: dict) -> dict:
    """LMD0311/PointMamba tools/builder.py save_checkpoint: the state dict of base_model.module (no DDP prefix)."""
    return {"base_model": sd, "optimizer": _optimizer_state(sd), "epoch": 299, "metrics": {"acc": 93.6},
            "best_metrics": {"acc": 93.6}}


def pcm_container(sd: dict) -> dict:
    """SkyworkAI/PointCloudMamba openpoints/utils/ckpt_util.py save_checkpoint, with examples/classification/
    train.py's additioanl_dict={'best_val': ...}."""
    return {"model": sd, "optimizer": _optimizer_state(sd), "scheduler": _timm_scheduler_state(), "epoch": 249,
            "best_val": 93.1}


# ---------------------------------------------------------------- cases


@dataclass
class Case:
    name: str                     # the zoo entry
    kwargs: dict                  # a reduced architecture of the entry (everything the weights' shapes need)
    container: Any                # the object the official script passes to torch.save
    filename: str                 # the official file name
    inputs: Callable[[], tuple]   # float64 inputs
    reference: Callable[[tuple], torch.Tensor]  # the float64 forward of the weights in the file
    official_keys: tuple = ()     # key names read from the official code, checked to be in the file
    seeded: bool = False          # the forward draws random numbers (masking): seed before each call


def _double(sd: dict) -> dict:
    return {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}


def _source_model(name: str, kwargs: dict) -> torch.nn.Module:
    """The entry with random weights (biases and norms moved off their constant inits so each one matters)."""
    torch.manual_seed(0)
    model = zoo.create_model(name, **kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _with_own_forward(model: torch.nn.Module) -> Callable[[tuple], torch.Tensor]:
    reference = model.double()
    return lambda inputs: reference(*inputs)


def case_vim() -> Case:
    sd = vim_official_state_dict(192, 2, patch=16, grid=(14, 14), classes=1000, seed=1)
    g = torch.Generator().manual_seed(2)
    return Case(
        "vim_tiny", dict(depth=2), vim_container(sd), "vim_t_midclstok_76p1acc.pth",
        lambda: (torch.randn(2, 3, 224, 224, generator=g, dtype=torch.float64),),
        lambda x: vim_official_forward(_double(sd), x[0], depth=2, stride=16)[1],
        ("layers.1.mixer.A_b_log", "layers.0.mixer.conv1d_b.weight", "norm_f.weight", "cls_token", "head.bias"),
    )


def case_vmamba() -> Case:
    sd = vmamba_official_state_dict(VMAMBA_TINY["depths"], VMAMBA_TINY["dims"], VMAMBA_TINY["ssm_ratio"], classes=1000, seed=1)
    g = torch.Generator().manual_seed(2)
    return Case(
        "vmamba_tiny", dict(VMAMBA_TINY, ssm_ratio=VMAMBA_TINY["ssm_ratio"]), vmamba_container(sd, "vssm1_tiny_0230s"),
        "vssm1_tiny_0230s_ckpt_epoch_264.pth",
        lambda: (torch.randn(2, 3, 37, 45, generator=g, dtype=torch.float64),),
        lambda x: vmamba_official_forward(_double(sd), x[0], VMAMBA_TINY["depths"])[0],
        ("patch_embed.5.weight", "layers.0.blocks.0.op.x_proj_weight", "layers.2.downsample.3.bias", "classifier.head.weight"),
    )


def case_efficient_vmamba() -> Case:
    depths, dims, d_state = EVM_TINY["depths"], EVM_TINY["dims"], EVM_TINY["ssm_d_state"]
    sd = evm_official_state_dict(depths, dims, d_state, classes=1000, seed=1)
    g = torch.Generator().manual_seed(2)
    return Case(
        "efficient_vmamba_tiny", dict(EVM_TINY), vmamba_container(sd, "vssm_efficient_tiny"), "efficient_vmamba_tiny.ckpt",
        lambda: (torch.randn(2, 3, 44, 52, generator=g, dtype=torch.float64),),
        lambda x: evm_official_forward(_double(sd), x[0], depths, d_state)[0],
        ("layers.2.3.reduction.weight", "layers.2.1.conv_pw2.1.running_var", "classifier.head.bias"),
    )


POINTMAMBA_SMALL = dict(trans_dim=32, depth=2, num_group=16, group_size=8, head_hidden=16)


def case_pointmamba(name: str, filename: str) -> Case:
    model = _source_model(name, POINTMAMBA_SMALL)
    sd = dict(model.state_dict())
    g = torch.Generator().manual_seed(2)
    return Case(
        name, dict(POINTMAMBA_SMALL), pointmamba_container(sd), filename,
        lambda: (torch.rand(2, 200, 3, generator=g, dtype=torch.float64) * 0.6,),
        lambda x: pointmamba_official_forward(model.double(), x[0]),
        ("encoder.first_conv.0.weight", "blocks.layers.1.mixer.A_log", "blocks.norm_f.bias", "pos_embed.2.weight",
         "OrderScale_gamma_1", "OrderScale_beta_2", "cls_head_finetune.8.weight"),
    )


def case_pointmamba_mpm() -> Case:
    kwargs = dict(trans_dim=32, depth=2, decoder_depth=1, num_group=16, group_size=8)
    model = _source_model("pointmamba_mpm", kwargs)
    sd = dict(model.state_dict())
    g = torch.Generator().manual_seed(2)
    return Case(
        "pointmamba_mpm", kwargs, pointmamba_container(sd), "pretrain.pth",
        lambda: (torch.rand(2, 200, 3, generator=g, dtype=torch.float64) * 0.6,),
        _with_own_forward(model),
        ("MAE_encoder.blocks.layers.1.mixer.x_proj.weight", "MAE_encoder.OrderScale_gamma_2", "mask_token",
         "MAE_decoder.blocks.norm_f.weight", "decoder_pos_embed.2.bias", "increase_dim.0.weight"),
        seeded=True,
    )


PCM_SMALL = {k: v for k, v in PCM_TEST_SMALL.items() if k != "num_classes"}


def case_pcm() -> Case:
    model = _source_model("pcm_modelnet40", PCM_SMALL)
    sd = dict(model.state_dict())
    g = torch.Generator().manual_seed(2)
    return Case(
        "pcm_modelnet40", dict(PCM_SMALL), pcm_container(sd), "PCM_ckpt_best.pth",
        lambda: (torch.rand(2, 64, 3, generator=g, dtype=torch.float64),),
        _with_own_forward(model),
        ("encoder.embedding.net.0.weight", "encoder.local_grouper_list.1.affine_alpha", "encoder.mamba_blocks_list.1.1.mixer.A_b_log",
         "encoder.order_prompt.weight", "prediction.head.4.0.bias"),
    )


def case_mambamil() -> Case:
    torch.manual_seed(0)
    kwargs = dict(in_dim=12, embed_dim=16, rate=3, num_classes=2)
    model = zoo.create_model("mambamil", **kwargs).eval()
    _perturb(model)
    sd = dict(model.state_dict())
    g = torch.Generator().manual_seed(2)
    return Case(
        # utils/core_utils.py: torch.save(model.state_dict(), "s_{fold}_checkpoint.pt"), a bare state dict.
        "mambamil", kwargs, sd, "s_0_checkpoint.pt",
        lambda: (torch.randn(11, 12, generator=g, dtype=torch.float64),),
        lambda x: _mambamil_ref(model.double(), x[0]),
        ("_fc1.0.weight", "layers.0.1.A_b_log", "layers.1.0.weight", "attention.2.bias", "classifier.weight"),
    )


def case_smamba() -> Case:
    ref, _ = smamba_official_and_converted()
    # exp/exp_long_term_forecasting.py (EarlyStopping.save_checkpoint): torch.save(model.state_dict(), path +
    # '/checkpoint.pth'), a bare state dict; with --use_multi_gpu the model is an nn.DataParallel ("module.").
    sd = {"module." + k: v for k, v in ref.state_dict().items()}
    g = torch.Generator().manual_seed(2)
    kwargs = {k: SMAMBA_TINY[k] for k in ("seq_len", "pred_len", "d_model", "d_state", "d_ff", "e_layers")}
    return Case(
        "smamba", kwargs, sd, "checkpoint.pth",
        lambda: (torch.randn(3, SMAMBA_TINY["seq_len"], 5, generator=g, dtype=torch.float64) * 4 + 2,),
        lambda x: smamba_official_forward(ref.double(), x[0]),
        ("enc_embedding.value_embedding.weight", "encoder.attn_layers.1.attention_r.A_log",  # "module." is stripped
         "encoder.attn_layers.0.conv1.weight", "projector.bias"),
    )


CASES = {
    "vim": case_vim,
    "vmamba": case_vmamba,
    "efficient_vmamba": case_efficient_vmamba,
    "pointmamba_modelnet40": lambda: case_pointmamba("pointmamba_modelnet40", "finetune_modelnet.pth"),
    "pointmamba_scanobjectnn": lambda: case_pointmamba("pointmamba_scanobjectnn", "finetune_scan_objbg.pth"),
    "pointmamba_mpm": case_pointmamba_mpm,
    "pcm": case_pcm,
    "mambamil": case_mambamil,
    "smamba": case_smamba,
}
# Entries whose default tag registers a source for pretrained=True (PCM's files are on the hub under names its
# repository does not list; MambaMIL and S-Mamba release no weights).
PRETRAINED_ROUTE = ("vim", "vmamba", "efficient_vmamba", "pointmamba_modelnet40", "pointmamba_scanobjectnn", "pointmamba_mpm")


def _forward(model: torch.nn.Module, case: Case, inputs: tuple) -> torch.Tensor:
    if case.seeded:
        torch.manual_seed(7)
    with torch.no_grad():
        return model(*inputs)


def _check(model: torch.nn.Module, case: Case) -> None:
    inputs = case.inputs()
    model = model.double().eval()
    if case.seeded:
        torch.manual_seed(7)
    with torch.no_grad():
        expected = case.reference(inputs)
    got = _forward(model, case, inputs)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)


@pytest.fixture
def offline_caches(monkeypatch, tmp_path):
    """Empty Hugging Face and torch hub caches under tmp_path, and ZOO_OFFLINE=1: nothing may be downloaded."""
    hf_cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_cache))  # read once, at import
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("ZOO_OFFLINE", "1")
    return hf_cache


def _put_in_cache(cfg: dict, container: Any, hf_cache) -> Any:
    """Write the file where the entry's pretrained cfg will look for it: the Hugging Face cache layout
    (snapshots/<revision>/<file> plus refs/main) for hf-hub sources, the URL's cache path for URLs."""
    if cfg.get("hf_hub_id"):
        repo = hf_cache / ("models--" + cfg["hf_hub_id"].replace("/", "--"))
        path = repo / "snapshots" / REVISION / cfg["hf_hub_filename"]
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(REVISION)
    else:
        path = hub.url_cache_path(cfg["url"])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(container, path)
    return path


@pytest.mark.parametrize("family", list(CASES))
def test_official_file_loads_through_checkpoint_path(family, tmp_path):
    case = CASES[family]()
    path = tmp_path / case.filename
    torch.save(case.container, path)
    keys = set(hub.load_checkpoint(path))
    missing = [k for k in case.official_keys if k not in keys]
    assert not missing, f"the file lacks official keys {missing}"
    model = zoo.create_model(case.name, checkpoint_path=str(path), **case.kwargs)
    _check(model, case)


@pytest.mark.parametrize("family", PRETRAINED_ROUTE)
def test_official_file_loads_through_pretrained_from_the_cache(family, offline_caches):
    case = CASES[family]()
    cfg = zoo.model_info(case.name)["default_cfg"]
    path = _put_in_cache(cfg, case.container, offline_caches)
    # The registered sha256 (where there is one) is the released file's; this file is ours.
    model = zoo.create_model(case.name, pretrained=True, pretrained_cfg_overlay=dict(sha256=hub.file_sha256(path)), **case.kwargs)
    _check(model, case)


def test_pretrained_offline_without_the_file_fails_at_once_and_says_how_to_give_one(offline_caches):
    for name in ("vim_tiny", "pointmamba_modelnet40"):  # an hf-hub source and a URL source
        with pytest.raises(FileNotFoundError, match="offline mode is on .*checkpoint_path="):
            zoo.create_model(name, pretrained=True, depth=1)


def test_file_of_another_entry_is_refused_strictly(tmp_path):
    case = case_pointmamba("pointmamba_modelnet40", "finetune_modelnet.pth")
    path = tmp_path / case.filename
    torch.save(case.container, path)
    with pytest.raises(hub.CheckpointError, match="does not fit PointMamba .*shape mismatches"):
        zoo.create_model("pointmamba_modelnet40", checkpoint_path=str(path), **{**case.kwargs, "trans_dim": 48})


# ---------------------------------------------------------------- float64 everywhere


class _Downcasts(TorchDispatchMode):
    """Records every op that takes a float64 tensor and returns a floating tensor of lower precision."""

    def __init__(self):
        super().__init__()
        self.found: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat_in = torch.utils._pytree.tree_leaves((args, kwargs))
        if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in flat_in):
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
                    self.found.add(f"{func} -> {t.dtype}")
        return out


def _float64_input(model, name):
    """cards.default_input at a size that keeps the whole sweep short (shapes the entry accepts)."""
    args, _ = cards.default_input(model, name)
    cls = type(model).__name__
    if cls in ("VisionMamba", "VMamba", "EfficientVMamba"):
        args = (args[0][..., :64, :64],)
    elif cls.startswith("Point") and cls != "PointMambaPartSeg":
        args = (args[0][:, :512],)
    elif cls in ("MambaMIL", "ABMIL", "TransMIL"):
        args = ([args[0][0][:100]],)
    elif cls == "MambaLMHeadModel":
        args = (args[0][:, :40],)
    elif cls == "MambAttention":
        args = (args[0][:, :2000],)
    return tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else
                 [t.double() for t in a] if isinstance(a, list) else a for a in args)


def _sweep_kwargs(name: str) -> dict:
    """The language models in float64 at full size need up to 22 GB (mamba_2_8b): the sweep builds them with 2 layers
    of width 64 (3 with one attention layer for the hybrid), their own mixer and attention options kept."""
    from zoo.models.language import model_config

    if zoo.model_info(name)["module"] != "zoo.models.language.mamba_lm":
        return cards._extra_kwargs(name)
    return dict(d_model=64, n_layer=3, attn_layer_idx=[1]) if model_config(name)["attn_layer_idx"] else dict(d_model=64, n_layer=2)


@pytest.mark.parametrize("name", cards.entry_names())
def test_every_entry_runs_in_float64_without_rounding_down(name):
    torch.manual_seed(0)
    model = zoo.create_model(name, **_sweep_kwargs(name)).eval().double()
    args = _float64_input(model, name)
    mode = _Downcasts()
    with torch.no_grad(), mode:
        out = model(*args)
    out = out[0] if isinstance(out, tuple) else out
    assert out.dtype == torch.float64
    assert torch.isfinite(out).all()
    assert not mode.found, f"{name} rounds float64 tensors down: {sorted(mode.found)}"


@pytest.mark.parametrize("in_chans", [1, 4])
def test_official_file_into_another_in_chans_and_num_classes(in_chans, tmp_path):
    """As timm's loader: the cfg's first_conv weights adapted (adapt_input_conv), the classifier replaced."""
    from timm.models import adapt_input_conv

    case = case_vim()
    path = tmp_path / case.filename
    torch.save(case.container, path)
    model = zoo.create_model(case.name, checkpoint_path=str(path), in_chans=in_chans, num_classes=7, **case.kwargs)
    rgb = case.container["model"]["patch_embed.proj.weight"]
    torch.testing.assert_close(model.patch_embed.proj.weight, adapt_input_conv(in_chans, rgb), rtol=0, atol=0)
    assert model.head.out_features == 7
    assert model(torch.randn(1, in_chans, 224, 224)).shape == (1, 7)
    # The same through timm's create_model with the weights named by the pretrained cfg (pretrained=True).
    timm_model = timm.create_model(case.name, pretrained=True, in_chans=in_chans, num_classes=7,
                                   pretrained_cfg_overlay=dict(file=str(path)), **case.kwargs)
    torch.testing.assert_close(timm_model.patch_embed.proj.weight, model.patch_embed.proj.weight, rtol=0, atol=0)
    vm = case_vmamba()
    torch.save(vm.container, tmp_path / vm.filename)
    gray = zoo.create_model(vm.name, checkpoint_path=str(tmp_path / vm.filename), in_chans=in_chans, **vm.kwargs)
    first = gray.pretrained_cfg["first_conv"]
    assert gray.get_submodule(first).weight.shape[1] == in_chans
