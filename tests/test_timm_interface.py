"""timm's model interface on every registered entry (issue 21): pretrained cfgs that name the input conv and the
classifier (and the pooled grid for images), as zoo and timm see them; get_classifier, head_hidden_size,
reset_classifier, grad checkpointing and forward_head(pre_logits=True)."""
import copy
import fnmatch
import math

import pytest
import timm
import torch
from timm.layers import get_channel_dim, get_spatial_dim
from torch import nn

import zoo
from zoo import cards, registry

ENTRIES = cards.entry_names()
VISION = ("VisionMamba", "VMamba", "EfficientVMamba")
# Heads whose classifier is the last Linear of an MLP (the official layouts): pre-logits are the pooled features.
MLP_HEADS = ("PointMamba", "PointCloudMamba")
# Heads with BatchNorm over one value per sample (the official layouts): training on a batch of 1 is a clear error.
BATCHNORM_HEADS = MLP_HEADS + ("PointMambaPartSeg",)
# Entries without a classifier: the masked point modelling model returns its loss; the speech enhancement models
# map waveforms to waveforms.
ENHANCEMENT = ("mambattention", "mambattention_tiny", "mamba_se", "mamba_se_tiny")
NO_CLASSIFIER = ("pointmamba_mpm",) + ENHANCEMENT
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
        "chimera": (dict(d_model=16, e_layers=1, patch_len=8), (series,)),
        "chimera_classifier": (dict(seq_len=96, num_classes=3, d_model=16, e_layers=1, patch_len=8), (series,)),
        "mamba_kws_tiny": (dict(), (torch.randn(2, 4000, generator=g), torch.tensor([4000, 3000]))),
        "conmamba_ctc_large": (dict(d_model=32, depth=1, d_ffn=32), (torch.randn(2, 4000, generator=g), torch.tensor([4000, 3000]))),
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
    forecaster = type(model).__name__ in ("SMamba", "Chimera")  # the "classifier" is the horizon: (batch, pred_len, variates)
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


@pytest.mark.parametrize("name", ["mambamil.digit_bags", "abmil", "transmil", "pcm_tiny_modelnet40", "mamba_kws_tiny",
                                  "conmamba_ctc_large"])
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


# ---------------------------------------------------------------- timm's own model tests, restated
# timm's tests/test_models.py is not part of the installed package (pip's timm ships no tests), so its functions are
# restated here from timm's repository (main, 1.0.29.dev0, the newest stored), over every registered entry created
# through timm.create_model, with the same names and checks: test_model_forward, test_model_backward,
# test_model_default_cfgs (spatial feature maps), test_model_default_cfgs_non_std (the others),
# test_model_forward_intermediates and test_model_forward_intermediates_features. Differences, all for speed on a
# 2-core CI: entries are built small (TIMM_TINY: fewer, narrower layers, the entry's other options kept), images are
# 64 px (SMALL_IMAGE) and the other modalities' inputs short (TIMM_INPUT). timm's test_model_load_pretrained
# (in_chans=1, num_classes=5) is test_official_file_into_another_in_chans_and_num_classes in
# test_official_checkpoints.py; its torchscript / FX tests are in test_timm_features_compile.py
# (EXCLUDE_JIT_FILTERS / EXCLUDE_FX_FILTERS).
TARGET_FWD_SIZE = MAX_FWD_SIZE = 384  # timm's constants
TARGET_BWD_SIZE = 128
MAX_FWD_OUT_SIZE = 448
TARGET_FFEAT_SIZE = 96

TIMM_TINY = {  # by the entry's module
    "vim": dict(depth=2, embed_dim=32),
    "vmamba": dict(depths=(1, 1, 1, 1), dims=16),
    "efficient_vmamba": dict(depths=(1, 1, 1, 1), dims=16),
    "pointmamba": dict(trans_dim=32, depth=1, num_group=16, group_size=8),
    "pcm": dict(embed_dim=16, dim_expansion=(1, 2), pre_blocks=(1, 1), mamba_blocks=(1, 2), k_neighbors=(4, 4),
                reducers=(1, 2), orders=("xyz", "hilbert", "zyx"), prompt_num_per_order=2, prompt_dim=8),
    "mambamil": dict(embed_dim=32),
    "baselines": dict(embed_dim=32),
    "smamba": dict(d_model=16, d_ff=16, e_layers=1),
    "chimera": dict(d_model=16, e_layers=1),
    "mamba_asr": dict(d_model=32, depth=1, d_ffn=32),
    "samba_asr": dict(d_model=32, depth=1, dec_depth=1, num_heads=2, ctc_weight=0.0),  # the CTC head is loss()'s only
    "mambattention": dict(hid_feature=16, num_blocks=1, num_heads=4, expand=1),
}
TIMM_ENTRIES = zoo.list_models()
VISION_MODULES = ("vim", "vmamba", "efficient_vmamba")

# timm's NON_STD_FILTERS: models whose forward_features is not a (B, C, H, W)-style map of the cfg's pool_size. Vim
# is a ViT (tokens), and no non-image family has a spatial map. VMamba and EfficientVMamba are the standard ones.
NON_STD_FILTERS = ["vim_*", "pointmamba_*", "pcm_*", "mambamil*", "abmil*", "transmil", "smamba*", "chimera*", "mamba_*",
                   "mamba2*", "conmamba_*", "mambattention*", "samba_*"]
# timm's FEAT_INTER_FILTERS (models with forward_intermediates and the getter features_only wrapper): the vision ones.
FEAT_INTER_FILTERS = ["vim_*", "vmamba_*", "efficient_vmamba_*"]
# test_model_backward builds the model with num_classes=42 and checks the logits' last dimension. Excluded: the
# language models (the head's width is the padded vocabulary, vocab_size, not num_classes), the S-Mamba forecasters
# (the head is the horizon pred_len; outputs (batch, pred_len, variates)) and pointmamba_mpm (masked point
# modelling: it returns its loss and has no classifier).
# pointmamba_partseg: its classes are num_parts, per point (num_classes is not its argument).
LM_FILTERS = ["mamba_*m", "mamba_*b", "mamba2*"]
FORECASTER_FILTERS = ["smamba", "smamba_[!c]*", "chimera"]
EXCLUDE_BWD_FILTERS = LM_FILTERS + FORECASTER_FILTERS + ["pointmamba_mpm", "pointmamba_partseg"] + list(ENHANCEMENT)
# test_model_default_cfgs_non_std resets the classifier to nothing (reset_classifier(0), num_classes=0) and expects
# pooled pre-logits out of forward. Excluded: pointmamba_mpm (no classifier), pointmamba_partseg (per-point part
# logits: it refuses 0 parts, there is no pooled output), the language models (the head is the vocabulary
# projection, which they refuse to drop: num_classes >= 1) and the forecasters (reset_classifier(0) is a horizon of
# 0 steps, (batch, 0, variates), not pre-logits).
# Samba-ASR: its head is the decoder's vocabulary (padding, symbols, start/end), which it refuses to drop, as the
# language models; its forward returns decoder logits (b, tokens, vocabulary), not encoder features.
EXCLUDE_CFG_FILTERS = list(NO_CLASSIFIER) + ["pointmamba_partseg"] + LM_FILTERS + FORECASTER_FILTERS + ["samba_*"]


def _module_of(name):
    return registry._entrypoints[registry.split_model_name(name)[0]].__module__.split(".")[-1]


def _timm_tiny(name):
    module = _module_of(name)
    if module == "mamba_lm":
        from zoo.models.language import model_config
        return dict(d_model=64, n_layer=3, attn_layer_idx=[1]) if model_config(name)["attn_layer_idx"] else dict(d_model=64, n_layer=2)
    kwargs = {**TIMM_TINY.get(module, {}), **cards._extra_kwargs(name)}
    if name == "pointmamba_partseg":
        kwargs["fetch_idx"] = (0,)  # its feature taps, one per block kept
    return kwargs


# Image entries at 64 x 64 instead of their cfg's 224 (a tenth of the tokens): the cfg says so through
# pretrained_cfg_overlay, with the pooled grid at that size (7 x 7 at 224: 2 x 2), so the tests read a true cfg.
SMALL_IMAGE = 64


def _create(name, **kwargs):
    torch.manual_seed(0)
    kwargs = {**_timm_tiny(name), **kwargs}
    if _module_of(name) in VISION_MODULES:
        cfg = timm.models.get_pretrained_cfg(name)
        pool = tuple(p * SMALL_IMAGE // cfg.input_size[-1] for p in cfg.pool_size)
        kwargs["pretrained_cfg_overlay"] = dict(input_size=(3, SMALL_IMAGE, SMALL_IMAGE), pool_size=pool)
        if _module_of(name) == "vim":
            kwargs["img_size"] = SMALL_IMAGE  # its position embedding has one entry per patch
    return timm.create_model(name, pretrained=False, **kwargs)


def _matches(name, filters):
    return any(fnmatch.fnmatch(name, f) for f in filters)


def _get_input_size(model, target=None):
    """timm's _get_input_size(model=...) for image cfgs."""
    cfg = model.default_cfg
    input_size = cfg["input_size"]
    if cfg.get("fixed_input_size"):
        return input_size
    if cfg.get("min_input_size"):
        if target and max(input_size) > target:
            return cfg["min_input_size"]
    elif target and max(input_size) > target:
        return tuple(min(x, target) for x in input_size)
    return input_size


def TIMM_INPUT(model, batch_size, target=None):
    """The inputs of a batch: timm's image size; a short sample of the other modalities' inputs."""
    g = torch.Generator().manual_seed(batch_size)
    cls = type(model).__name__
    if cls in VISION:
        return (torch.randn(batch_size, *_get_input_size(model, target), generator=g),)
    if cls == "PointMambaPartSeg":
        return torch.randn(batch_size, 256, 3, generator=g), torch.arange(batch_size) % 16
    if cls.startswith("Point"):
        return (torch.randn(batch_size, 256, 3, generator=g),)
    if cls in ("MambaMIL", "ABMIL", "TransMIL"):
        return ([torch.randn(20 + 7 * i, model.in_dim, generator=g) for i in range(batch_size)],)
    if cls in ("SMamba", "SMambaClassifier", "Chimera", "ChimeraClassifier"):
        return (torch.randn(batch_size, model.seq_len, model.enc_in or 7, generator=g),)
    if cls in ("MambaSpeechEncoder", "SambaASR"):
        return torch.randn(batch_size, 4000, generator=g), torch.full((batch_size,), 4000)
    if cls == "MambAttention":
        return (torch.randn(batch_size, 4000, generator=g),)
    if cls == "MambaLMHeadModel":
        return (torch.randint(0, model.vocab_size, (batch_size, 24), generator=g),)
    raise AssertionError(f"no input for {cls}")


def _out(outputs):
    return outputs[0] if isinstance(outputs, tuple) else outputs  # speech: (logits, frame counts)


@pytest.mark.parametrize("batch_size", [1])
@pytest.mark.parametrize("model_name", TIMM_ENTRIES)
def test_model_forward(model_name, batch_size):
    """timm's test_model_forward: a forward of batch 1, finite; grad checkpointing does not change it."""
    model = _create(model_name).eval()
    inputs = TIMM_INPUT(model, batch_size, TARGET_FWD_SIZE)
    with torch.no_grad():
        outputs = _out(model(*inputs))
    assert model_name in NO_CLASSIFIER or outputs.shape[0] == batch_size  # pointmamba_mpm: its loss
    assert not torch.isnan(outputs).any(), "Output included NaNs"
    # Grad checkpointing, where supported (as timm: a model without it passes), does not change the output.
    try:
        model.set_grad_checkpointing()
    except Exception:
        return
    with torch.no_grad():
        outputs2 = _out(model(*inputs))
    assert torch.allclose(outputs, outputs2, rtol=1e-4, atol=1e-5), "Output does not match"


@pytest.mark.parametrize("batch_size", [2])
@pytest.mark.parametrize("model_name", [n for n in TIMM_ENTRIES if not _matches(n, EXCLUDE_BWD_FILTERS)])
def test_model_backward(model_name, batch_size):
    """timm's test_model_backward: num_classes=42, training mode; every parameter gets a gradient."""
    model = _create(model_name, num_classes=42)
    num_params = sum(x.numel() for x in model.parameters())
    model.train()
    inputs = TIMM_INPUT(model, batch_size, TARGET_BWD_SIZE)
    outputs = _out(model(*inputs))
    outputs.mean().backward()
    for n, x in model.named_parameters():
        assert x.grad is not None, f"No gradient for {n}"
    num_grad = sum(x.grad.numel() for x in model.parameters() if x.grad is not None)
    assert outputs.shape[-1] == 42
    assert num_params == num_grad, "Some parameters are missing gradients"
    assert not torch.isnan(outputs).any(), "Output included NaNs"


def _check_cfg_names(cfg, state_dict):
    """The end of timm's default-cfg tests: classifier and first_conv name parameters."""
    if cfg.get("num_classes", None):
        classifier = cfg["classifier"]
        for c in (classifier,) if isinstance(classifier, str) else classifier:
            assert c + ".weight" in state_dict, f"{c} not in model params"
    first_conv = cfg["first_conv"]
    first_conv = (first_conv,) if isinstance(first_conv, str) else first_conv
    assert isinstance(first_conv, (tuple, list))
    for fc in first_conv:
        assert fc + ".weight" in state_dict, f"{fc} not in model params"


@pytest.mark.parametrize("batch_size", [1])
@pytest.mark.parametrize("model_name", [n for n in TIMM_ENTRIES if not _matches(n, NON_STD_FILTERS)])
def test_model_default_cfgs(model_name, batch_size):
    """timm's test_model_default_cfgs: spatial features of the cfg's pool_size, pre-logits of head_hidden_size,
    reset_classifier(0) and (0, '') and num_classes=0, global_pool='' at creation."""
    model = _create(model_name).eval()
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    state_dict = model.state_dict()
    cfg = model.default_cfg
    pool_size = cfg["pool_size"]
    input_size = cfg["input_size"]
    output_fmt = getattr(model, "output_fmt", "NCHW")
    spatial_axis = get_spatial_dim(output_fmt)
    assert len(spatial_axis) == 2
    feat_axis = get_channel_dim(output_fmt)
    assert all(x <= MAX_FWD_OUT_SIZE for x in input_size)
    input_tensor = torch.randn((batch_size, *input_size))
    with torch.no_grad():
        outputs = model.forward_features(input_tensor)
        outputs_pre = model.forward_head(outputs, pre_logits=True)
        assert outputs.shape[spatial_axis[0]] == pool_size[0] and outputs.shape[spatial_axis[1]] == pool_size[1]
        assert outputs.shape[feat_axis] == model.num_features
        assert outputs_pre.shape[1] == model.head_hidden_size
        model.reset_classifier(0)
        assert model.num_classes == 0
        outputs = model(input_tensor)
        assert len(outputs.shape) == 2 and outputs.shape[1] == model.head_hidden_size
        assert outputs.shape == outputs_pre.shape
        model.reset_classifier(0, "")
        outputs = model(input_tensor)
        assert len(outputs.shape) == 4
        assert outputs.shape[spatial_axis[0]] == pool_size[0] and outputs.shape[spatial_axis[1]] == pool_size[1]
        model = _create(model_name, num_classes=0, global_pool="").eval()
        outputs = model(input_tensor)
        assert len(outputs.shape) == 4
        assert outputs.shape[spatial_axis[0]] == pool_size[0] and outputs.shape[spatial_axis[1]] == pool_size[1]
    _check_cfg_names(cfg, state_dict)


@pytest.mark.parametrize("batch_size", [1])
@pytest.mark.parametrize("model_name", [n for n in TIMM_ENTRIES if _matches(n, NON_STD_FILTERS)
                                        and not _matches(n, EXCLUDE_CFG_FILTERS)])
def test_model_default_cfgs_non_std(model_name, batch_size):
    """timm's test_model_default_cfgs_non_std: features of num_features, pre-logits of head_hidden_size, equal to
    the output after reset_classifier(0); num_classes=0 at creation."""
    model = _create(model_name).eval()
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    state_dict = model.state_dict()
    cfg = model.default_cfg
    inputs = TIMM_INPUT(model, batch_size, TARGET_FWD_SIZE)
    feat_dim = getattr(model, "feature_dim", None)
    with torch.no_grad():
        outputs = model.forward_features(*inputs)
        outputs = _out(outputs)  # speech: (features, frame counts)
        outputs_pre = model.forward_head(outputs, pre_logits=True)
        if feat_dim is None:
            feat_dim = -1 if outputs.ndim == 3 else 1
        assert outputs.shape[feat_dim] == model.num_features
        assert outputs_pre.shape[1 if outputs_pre.ndim == 2 else -1] == model.head_hidden_size
        model.reset_classifier(0)
        assert model.num_classes == 0
        outputs = _out(model(*inputs))
        assert outputs.shape[-1 if outputs.ndim == 3 else 1] == model.head_hidden_size, "pooled num_features != config"
        assert outputs.shape == outputs_pre.shape
        model = _create(model_name, num_classes=0).eval()
        outputs = _out(model(*inputs))
        assert outputs.shape[-1 if outputs.ndim == 3 else 1] == model.num_features
    _check_cfg_names(cfg, state_dict)


def _min_levels(model_name):
    """timm asks for at least 3 feature levels; Vim is a plain ViT (one level per block, all at the patch stride),
    with depth 2 here; VMamba and EfficientVMamba have 4 stages."""
    return 2 if _module_of(model_name) == "vim" else 3


def _check_features_only(model_name, batch_size, **feature_kwargs):
    model = _create(model_name, features_only=True, **feature_kwargs).eval()
    expected_channels = model.feature_info.channels()
    assert len(expected_channels) >= _min_levels(model_name)
    expected_reduction = model.feature_info.reduction()
    input_size = _get_input_size(model, TARGET_FFEAT_SIZE)
    output_fmt = getattr(model, "output_fmt", "NCHW")
    feat_axis, spatial_axis = get_channel_dim(output_fmt), get_spatial_dim(output_fmt)
    with torch.no_grad():
        outputs = model(torch.randn((batch_size, *input_size)))
    assert len(expected_channels) == len(outputs)
    for e, r, o in zip(expected_channels, expected_reduction, outputs):
        assert e == o.shape[feat_axis]
        assert o.shape[spatial_axis[0]] <= math.ceil(input_size[-2] / r) + 1
        assert o.shape[spatial_axis[1]] <= math.ceil(input_size[-1] / r) + 1
        assert o.shape[0] == batch_size
        assert not torch.isnan(o).any()


@pytest.mark.parametrize("batch_size", [1])
@pytest.mark.parametrize("model_name", [n for n in TIMM_ENTRIES if _matches(n, FEAT_INTER_FILTERS)])
def test_model_forward_features(model_name, batch_size):
    """timm's test_model_forward_features: features_only=True with the default wrapper (zoo's: the getter; timm's
    list / dict / hook / fx wrappers are refused, see test_unsupported_feature_cls_is_a_clear_error)."""
    _check_features_only(model_name, batch_size)


@pytest.mark.parametrize("batch_size", [1])
@pytest.mark.parametrize("model_name", [n for n in TIMM_ENTRIES if _matches(n, FEAT_INTER_FILTERS)])
def test_model_forward_intermediates_features(model_name, batch_size):
    """timm's test_model_forward_intermediates_features: features_only with feature_cls='getter'."""
    _check_features_only(model_name, batch_size, feature_cls="getter")


@pytest.mark.parametrize("batch_size", [1])
@pytest.mark.parametrize("model_name", [n for n in TIMM_ENTRIES if _matches(n, FEAT_INTER_FILTERS)])
def test_model_forward_intermediates(model_name, batch_size):
    """timm's test_model_forward_intermediates: NCHW intermediates of feature_info's channels and reductions, the
    final output equal to forward_features, also with grad checkpointing."""
    model = _create(model_name).eval()
    feature_info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    expected_channels = feature_info.channels()
    expected_reduction = feature_info.reduction()
    assert len(expected_channels) >= _min_levels(model_name)
    input_size = _get_input_size(model, TARGET_FFEAT_SIZE)
    feat_axis, spatial_axis = get_channel_dim("NCHW"), get_spatial_dim("NCHW")
    inpt = torch.randn((batch_size, *input_size))
    with torch.no_grad():
        output, intermediates = model.forward_intermediates(inpt, output_fmt="NCHW")
        assert len(expected_channels) == len(intermediates)
        for e, r, o in zip(expected_channels, expected_reduction, intermediates):
            assert e == o.shape[feat_axis]
            assert o.shape[spatial_axis[0]] <= math.ceil(input_size[-2] / r) + 1
            assert o.shape[spatial_axis[1]] <= math.ceil(input_size[-1] / r) + 1
            assert o.shape[0] == batch_size
            assert not torch.isnan(o).any()
        output2 = model.forward_features(inpt)
        assert torch.allclose(output, output2)
        model.set_grad_checkpointing()
        output3, _ = model.forward_intermediates(inpt, output_fmt="NCHW")
        assert torch.allclose(output, output3, rtol=1e-4, atol=1e-5), "Output does not match"
