"""timm's model interface on every registered entry (issue 21): pretrained cfgs that name the input conv and the
classifier (and the pooled grid for images), as zoo and timm see them; get_classifier, head_hidden_size,
reset_classifier, grad checkpointing and forward_head(pre_logits=True)."""
import copy

import pytest
import timm
import torch
from torch import nn

import zoo
from zoo import cards, registry

ENTRIES = cards.entry_names()
VISION = ("VisionMamba", "VMamba", "EfficientVMamba")
# Heads whose classifier is the last Linear of an MLP (the official layouts): pre-logits are the pooled features.
MLP_HEADS = ("PointMamba", "PointCloudMamba")
# Heads with BatchNorm over one value per sample (the official layouts): training on a batch of 1 is a clear error.
BATCHNORM_HEADS = MLP_HEADS + ("PointMambaPartSeg",)
# Entries without a classifier: the masked point modelling model returns its loss.
NO_CLASSIFIER = ("pointmamba_mpm",)
# Heads without a bias in the official layout: the language models' lm_head (mamba-ssm's, tied to the embedding).
NO_HEAD_BIAS = ("MambaLMHeadModel",)


def _meta(name: str) -> nn.Module:
    with torch.device("meta"):
        return zoo.create_model(name, **cards._extra_kwargs(name))


def _timm_cfg(name: str) -> dict:
    arch, tag = registry.split_model_name(name)
    cfg = timm.models.get_pretrained_cfg(name if tag else arch)
    assert cfg is not None, f"timm has no pretrained cfg for {name}"
    return cfg.to_dict()


def _module(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError as e:
        raise AssertionError(f"{type(model).__name__} has no module '{path}'") from e


@pytest.mark.parametrize("name", ENTRIES)
def test_cfg_names_first_conv_and_classifier(name):
    model = _meta(name)
    for cfg in (model.pretrained_cfg, _timm_cfg(name)):
        conv = cfg.get("first_conv")
        assert conv, f"{name}: pretrained cfg has no first_conv"
        assert isinstance(getattr(_module(model, conv), "weight", None), nn.Parameter), f"{name}: {conv} has no weight"
        if type(model).__name__ in VISION:
            assert cfg.get("pool_size"), f"{name}: vision cfg has no pool_size"
        if name in NO_CLASSIFIER:
            assert cfg.get("classifier") is None
            continue
        clf = cfg.get("classifier")
        assert clf, f"{name}: pretrained cfg has no classifier"
        head = _module(model, clf)
        assert isinstance(getattr(head, "weight", None), nn.Parameter), f"{name}: {clf} has no weight"
        assert f"{clf}.weight" in model.state_dict()
        assert (f"{clf}.bias" in model.state_dict()) != (type(model).__name__ in NO_HEAD_BIAS)
        assert model.get_classifier() is head, f"{name}: get_classifier() is not {clf}"


@pytest.mark.parametrize("name", [n for n in ENTRIES if n not in NO_CLASSIFIER])
def test_head_hidden_size(name):
    model = _meta(name)
    assert isinstance(getattr(model, "head_hidden_size", None), int), f"{name}: no head_hidden_size"
    head = model.get_classifier()
    if isinstance(head, nn.Linear) and type(model).__name__ not in MLP_HEADS:
        assert model.head_hidden_size == head.in_features


def test_vision_pool_size_is_the_feature_grid():
    for name in [n for n in ENTRIES if "vim" in n or "vmamba" in n]:
        model = _meta(name)
        cfg = model.pretrained_cfg
        h, w = cfg["input_size"][1:]
        if type(model).__name__ == "VisionMamba":
            p, s = model.patch_embed.patch_size, model.patch_embed.stride
            p, s = (p if isinstance(p, tuple) else (p, p)), (s if isinstance(s, tuple) else (s, s))
            grid = ((h - p[0]) // s[0] + 1, (w - p[1]) // s[1] + 1)
        else:
            r = model.feature_info[-1]["reduction"]
            grid = (-(-h // r), -(-w // r))
        assert tuple(cfg["pool_size"]) == grid, name


def test_timm_create_model_sees_the_fields():
    with torch.device("meta"):
        model = timm.create_model("vim_tiny")
    assert model.pretrained_cfg["first_conv"] == "patch_embed.proj"
    assert model.pretrained_cfg["classifier"] == "head"
    assert timm.models.get_pretrained_cfg("pointmamba_partseg") is not None
    assert timm.models.get_pretrained_cfg("smamba") is not None


# One small model per class, with its input (batch 2) for the forward checks.
def _small():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(2, 3, 32, 32, generator=g)
    pts = torch.randn(2, 256, 3, generator=g)
    bags = [torch.randn(12, 64, generator=g), torch.randn(9, 64, generator=g)]
    series = torch.randn(2, 96, 7, generator=g)
    return {
        "vim_tiny.digits": (dict(), (img,)),
        "vmamba_tiny": (dict(depths=(1, 1, 1, 1), dims=16), (img,)),
        # 64 x 64: its stages have BatchNorm, which needs more than one value per channel (2 x 2 at the end)
        "efficient_vmamba_tiny": (dict(depths=(1, 1, 1, 1), dims=16), (torch.randn(2, 3, 64, 64, generator=g),)),
        "pointmamba_tiny": (dict(num_group=16, group_size=8, depth=1), (pts,)),
        "pointmamba_partseg": (dict(num_group=16, group_size=8, depth=1, fetch_idx=(0,)), (pts, torch.tensor([0, 3]))),
        "pcm_tiny_modelnet40": (dict(), (torch.randn(2, 1024, 3, generator=g),)),
        "mambamil.digit_bags": (dict(), (bags,)),
        "abmil": (dict(in_dim=64, embed_dim=32), (bags,)),
        "transmil": (dict(in_dim=64, embed_dim=32), (bags,)),
        "smamba_classifier": (dict(seq_len=96, num_classes=3, d_model=16, d_ff=16, e_layers=1), (series,)),
        "smamba_etth1": (dict(d_model=16, d_ff=16, e_layers=1), (series,)),
        "mamba_kws_tiny": (dict(), (torch.randn(2, 4000, generator=g), torch.tensor([4000, 3000]))),
    }


def _build(name):
    kwargs, inputs = _small()[name]
    torch.manual_seed(0)
    try:
        return zoo.create_model(name, **kwargs), inputs
    except ValueError:  # a family without those size keywords: its own defaults
        return zoo.create_model(name), inputs


def _batch(inputs, i):
    return tuple(x[i:i + 1] for x in inputs)


@pytest.mark.parametrize("name", list(_small()))
def test_reset_classifier_then_forward(name):
    model, inputs = _build(name)
    model.reset_classifier(5)
    model.eval()
    with torch.no_grad():
        out = model(*inputs)
    out = out[0] if isinstance(out, tuple) else out
    forecaster = type(model).__name__ == "SMamba"  # its "classifier" is the horizon: (batch, pred_len, variates)
    assert out.shape[0] == 2 and out.shape[1 if forecaster else -1] == 5
    clf = model.get_classifier()
    assert (clf.out_features if isinstance(clf, nn.Linear) else clf.out_channels) == 5
    # Training mode, one sample: works, or (BatchNorm in an official point head) says why not.
    model.train()
    one = _batch(inputs, 0)
    if type(model).__name__ in BATCHNORM_HEADS:
        with pytest.raises(ValueError, match="BatchNorm.*batch of 1"):
            model(*one)
        model(*inputs)  # batch 2 still trains
    else:
        out = model(*one)
        out = out[0] if isinstance(out, tuple) else out
        assert out.shape[0] == 1 and out.shape[1 if forecaster else -1] == 5


def test_point_heads_pre_logits_width():
    for name in ("pointmamba_tiny", "pcm_tiny_modelnet40"):
        model, inputs = _build(name)
        model.eval()
        with torch.no_grad():
            feats = model.forward_features(*inputs)
            assert model.forward_head(feats, pre_logits=True).shape == (2, model.head_hidden_size)


def _grads(model, inputs):
    model.zero_grad()
    torch.manual_seed(0)  # the same random choices (e.g. PCM's sampling) in both runs
    out = model(*inputs)
    (out[0] if isinstance(out, tuple) else out).square().sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["mambamil.digit_bags", "abmil", "transmil", "pcm_tiny_modelnet40"])
def test_grad_checkpointing_same_gradients(name, monkeypatch):
    model, inputs = _build(name)
    model.train()
    for m in model.modules():  # deterministic training forward: no dropout
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    calls = []
    import torch.utils.checkpoint as ckpt

    real = ckpt.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt, "checkpoint", counting)
    other = copy.deepcopy(model)
    ref = _grads(model, inputs)
    assert not calls
    other.set_grad_checkpointing(True)
    got = _grads(other, inputs)
    assert calls, f"{name}: set_grad_checkpointing(True) checkpoints nothing"
    assert ref.keys() == got.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("name", ["mamba_kws_tiny", "mamba_ctc_causal_tiny"])
def test_speech_forward_head_pre_logits(name):
    model = zoo.create_model(name).eval()
    wave = torch.randn(2, 4000)
    with torch.no_grad():
        x, frames = model.forward_features(wave, torch.tensor([4000, 3000]))
        pre = model.forward_head(x, pre_logits=True)
        assert pre.shape[-1] == model.head_hidden_size
        assert pre.shape[0] == 2
        pre2 = model.forward_head(x, frames, pre_logits=True)
        assert pre2.shape == pre.shape
