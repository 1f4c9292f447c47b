"""Vim (hustvl/Vim midclstok models): parameter counts, exactness against a re-statement of the
official forward, official checkpoint conversion, and the timm interface."""
import argparse
import math

import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.core.precision import upcast
from zoo.core.selective_scan import selective_scan_naive
from zoo.models.vision import vim
from zoo.models.vision.vim import VisionMamba, checkpoint_filter_fn, resample_pos_embed

TINY = dict(embed_dim=24, depth=3, patch_size=8, stride=8, img_size=(24, 40))  # 3 x 5 grid, class token at 7


def official_param_count(D, depth=24, d_state=16, expand=2, d_conv=4, patch=16, grid=(14, 14), in_chans=3, classes=1000):
    """Parameters of the official VisionMamba (bimamba v2, RMSNorm without bias, one class token)."""
    E, R = expand * D, math.ceil(D / 16)
    direction = E * d_conv + E + E * (R + 2 * d_state) + (R * E + E) + E * d_state + E  # conv1d, x_proj, dt_proj, A_log, D
    layer = D * 2 * E + 2 * direction + E * D + D  # in_proj, both directions, out_proj, norm
    stem = in_chans * patch * patch * D + D + D + (grid[0] * grid[1] + 1) * D  # patch_embed, cls_token, pos_embed
    return depth * layer + stem + D + D * classes + classes  # + norm_f + head


def official_state_dict(D, depth, d_state=16, expand=2, d_conv=4, patch=8, grid=(3, 5), in_chans=3, classes=10, seed=0):
    """Random tensors under the official key names and shapes (models_mamba.py + mamba_simple.py v2)."""
    g = torch.Generator().manual_seed(seed)
    E, R = expand * D, math.ceil(D / 16)

    def rnd(*shape, scale=0.3):
        return torch.randn(*shape, generator=g) * scale

    sd = {
        "patch_embed.proj.weight": rnd(D, in_chans, patch, patch, scale=0.05),
        "patch_embed.proj.bias": rnd(D),
        "cls_token": rnd(1, 1, D),
        "pos_embed": rnd(1, grid[0] * grid[1] + 1, D),
        "norm_f.weight": 1 + rnd(D),
        "head.weight": rnd(classes, D),
        "head.bias": rnd(classes),
    }
    for i in range(depth):
        p = f"layers.{i}."
        sd[p + "norm.weight"] = 1 + rnd(D)
        sd[p + "mixer.in_proj.weight"] = rnd(2 * E, D)
        sd[p + "mixer.out_proj.weight"] = rnd(D, E)
        for s in ("", "_b"):
            sd[p + f"mixer.conv1d{s}.weight"] = rnd(E, 1, d_conv)
            sd[p + f"mixer.conv1d{s}.bias"] = rnd(E)
            sd[p + f"mixer.x_proj{s}.weight"] = rnd(R + 2 * d_state, E)
            sd[p + f"mixer.dt_proj{s}.weight"] = rnd(E, R)
            sd[p + f"mixer.dt_proj{s}.bias"] = rnd(E) - 2
            sd[p + f"mixer.A{s}_log"] = torch.log(torch.arange(1, d_state + 1.0)).repeat(E, 1) + rnd(E, d_state, scale=0.1)
            sd[p + f"mixer.D{s}"] = 1 + rnd(E)
    return sd


def _rms_norm_prenorm(x, weight, residual, eps):
    """mamba-ssm's fused rms_norm_fn(prenorm=True, residual_in_fp32=True): (normed in x's dtype, fp32 residual);
    its float32 casts leave float64 alone (upcast), so that the restatement also runs in float64."""
    r = upcast(x) if residual is None else residual + upcast(x)
    return (r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + eps) * weight).to(x.dtype), r


def _inner_no_out_proj(xz, sd, p, s, d_state):
    """mamba_inner_fn_no_out_proj in its (batch, dim, length) layout for direction suffix s."""
    L = xz.shape[-1]
    x, z = xz.chunk(2, dim=1)
    w = sd[p + f"conv1d{s}.weight"]
    x = F.silu(F.conv1d(x, w, sd[p + f"conv1d{s}.bias"], padding=w.shape[-1] - 1, groups=x.shape[1])[..., :L])
    x_dbl = x.transpose(1, 2) @ sd[p + f"x_proj{s}.weight"].t()  # (b, l, r + 2n)
    dt_w = sd[p + f"dt_proj{s}.weight"]
    r = dt_w.shape[1]
    delta = x_dbl[..., :r] @ dt_w.t()
    A = -torch.exp(upcast(sd[p + f"A{s}_log"]))
    out = selective_scan_naive(
        x.transpose(1, 2), delta, A, x_dbl[..., r : r + d_state], x_dbl[..., r + d_state :], sd[p + f"D{s}"],
        z.transpose(1, 2), sd[p + f"dt_proj{s}.bias"], delta_softplus=True,
    )
    return out.transpose(1, 2)


def official_forward(sd, images, depth, stride, d_state=16, eps=1e-5):
    """The official VisionMamba.forward_features / forward (midclstok, fused add+norm) written out:
    the backward direction flips xz, runs the same causal path, and flips the result back."""
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=stride)
    x = x.flatten(2).transpose(1, 2)
    B, M, _ = x.shape
    pos = M // 2
    x = torch.cat((x[:, :pos], sd["cls_token"].expand(B, -1, -1), x[:, pos:]), dim=1) + sd["pos_embed"]
    hidden, residual = x, None
    for i in range(depth):
        p = f"layers.{i}."
        hidden, residual = _rms_norm_prenorm(hidden, sd[p + "norm.weight"], residual, eps)
        m = p + "mixer."
        xz = (hidden @ sd[m + "in_proj.weight"].t()).transpose(1, 2)  # (b, 2e, l)
        out = _inner_no_out_proj(xz, sd, m, "", d_state)
        out_b = _inner_no_out_proj(xz.flip([-1]), sd, m, "_b", d_state)
        hidden = ((out + out_b.flip([-1])).transpose(1, 2) / 2) @ sd[m + "out_proj.weight"].t()
    feats, _ = _rms_norm_prenorm(hidden, sd["norm_f.weight"], residual, eps)
    return feats, feats[:, pos] @ sd["head.weight"].t() + sd["head.bias"]


def _tiny_model(**kw):
    return VisionMamba(**{**TINY, "num_classes": 10, **kw})


# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize("name,dim,paper_m", [("vim_tiny", 192, 7), ("vim_small", 384, 26), ("vim_base", 768, 98)])
def test_param_counts_match_paper(name, dim, paper_m):
    with torch.device("meta"):
        model = zoo.create_model(name)
    n = sum(p.numel() for p in model.parameters())
    assert n == official_param_count(dim)
    assert round(n / 1e6) == paper_m and abs(n / 1e6 - paper_m) / paper_m < 0.03, n


@pytest.mark.parametrize("name,dim", [("vim_tiny_stride8", 192), ("vim_small_stride8", 384)])
def test_stride8_entries(name, dim):
    with torch.device("meta"):
        model = zoo.create_model(name)
    assert model.patch_embed.grid_size == (27, 27)  # (224 - 16) // 8 + 1
    assert sum(p.numel() for p in model.parameters()) == official_param_count(dim, grid=(27, 27))


# ---------------------------------------------------------------- exactness


@pytest.mark.parametrize("batch", [1, 2])
def test_forward_matches_official(batch):
    sd = official_state_dict(TINY["embed_dim"], TINY["depth"])
    model = _tiny_model().eval()
    model.load_state_dict(sd)
    images = torch.randn(batch, 3, *TINY["img_size"], generator=torch.Generator().manual_seed(1))
    feats, logits = official_forward(sd, images, TINY["depth"], TINY["stride"])
    with torch.no_grad():
        ours = model.forward_features(images)
        torch.testing.assert_close(ours, feats, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.forward_head(ours), logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(images), logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.forward_head(ours, pre_logits=True), feats[:, 7])


def test_overlapping_patches_match_official():
    cfg = dict(TINY, stride=4, img_size=(16, 24), depth=2)  # 3 x 5 grid of 8x8 patches at stride 4
    sd = official_state_dict(cfg["embed_dim"], cfg["depth"], grid=(3, 5))
    model = VisionMamba(**cfg, num_classes=10).eval()
    model.load_state_dict(sd)
    images = torch.randn(2, 3, 16, 24)
    _, logits = official_forward(sd, images, cfg["depth"], cfg["stride"])
    with torch.no_grad():
        torch.testing.assert_close(model(images), logits, rtol=1e-5, atol=1e-5)


def test_drop_path_schedule_is_official():
    model = VisionMamba(**{**TINY, "depth": 5}, drop_path_rate=0.2)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in model.layers]
    assert rates == pytest.approx([0.0, 0.0, 0.05, 0.1, 0.15])  # [0] + linspace(0, 0.2, 5), first 5
    assert model.drop_path.drop_prob == pytest.approx(0.2)  # before norm_f


# ---------------------------------------------------------------- position embedding and checkpoints


def test_resample_pos_embed_keeps_middle_class_token():
    D = 4
    old = torch.randn(1, 3 * 5 + 1, D)
    new = resample_pos_embed(old, (4, 6), (3, 5))
    assert new.shape == (1, 25, D)
    torch.testing.assert_close(new[:, 24 // 2], old[:, 15 // 2])  # class slot: middle to middle
    patches = torch.cat([old[:, :7], old[:, 8:]], dim=1).reshape(1, 3, 5, D).permute(0, 3, 1, 2)
    ref = F.interpolate(patches, size=(4, 6), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 24, D)
    torch.testing.assert_close(torch.cat([new[:, :12], new[:, 13:]], dim=1), ref)
    assert resample_pos_embed(old, (3, 5), (3, 5)) is old


def test_other_image_size_equals_model_built_for_it():
    """On-the-fly resampling (input grid differs) == a model built at that size from the converted checkpoint."""
    sd = official_state_dict(TINY["embed_dim"], TINY["depth"], grid=(4, 4))  # checkpoints: square grids
    model = _tiny_model(img_size=32).eval()
    model.load_state_dict(sd)
    big = _tiny_model(img_size=(40, 56)).eval()  # 5 x 7 grid
    big.load_state_dict(checkpoint_filter_fn({"model": sd}, big))
    images = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        torch.testing.assert_close(model(images), big(images), rtol=1e-5, atol=1e-5)


def _save_official(path, sd):
    # As vim/main.py saves it (less the optimizer state): its evaluation loads "model", not the EMA
    # copy, and the released files carry the run's argparse.Namespace, which the hub must accept.
    args = argparse.Namespace(model="vim_tiny", input_size=224, lr=5e-4)
    torch.save({"model": sd, "epoch": 299, "model_ema": {k: v + 1 for k, v in sd.items()}, "args": args}, path)


def test_official_checkpoint_loads_without_missing_or_unexpected_keys(tmp_path):
    sd = official_state_dict(192, 2, patch=16, grid=(14, 14), classes=1000)
    path = tmp_path / "vim_t_midclstok_76p1acc.pth"
    _save_official(path, sd)
    model = zoo.create_model("vim_tiny", checkpoint_path=str(path), depth=2)
    own = model.state_dict()
    assert own.keys() == sd.keys()
    for k in sd:
        torch.testing.assert_close(own[k], sd[k], rtol=0, atol=0, msg=k)


def test_checkpoint_adapts_image_size_and_head(tmp_path):
    sd = official_state_dict(192, 1, patch=16, grid=(14, 14), classes=1000)
    path = tmp_path / "ckpt.pth"
    _save_official(path, sd)
    model = zoo.create_model("vim_tiny", checkpoint_path=str(path), depth=1, img_size=96, num_classes=7)
    assert model.pos_embed.shape == (1, 6 * 6 + 1, 192)
    torch.testing.assert_close(model.pos_embed[:, 18], sd["pos_embed"][:, 98])  # class token slot, middle
    torch.testing.assert_close(model.pos_embed, resample_pos_embed(sd["pos_embed"], (6, 6), (14, 14)))
    assert model.head.weight.shape == (7, 192)
    torch.testing.assert_close(model.layers[0].mixer.A_b_log, sd["layers.0.mixer.A_b_log"])
    assert model(torch.randn(1, 3, 96, 96)).shape == (1, 7)
    headless = zoo.create_model("vim_tiny", checkpoint_path=str(path), depth=1, num_classes=0)
    assert not any(k.startswith("head.") for k in headless.state_dict())
    assert headless(torch.randn(1, 3, 32, 32)).shape == (1, 192)


def test_checkpoint_to_other_patch_size():
    sd = official_state_dict(24, 1, patch=16, grid=(2, 2))  # 32 x 32 images in 16 x 16 patches
    model = VisionMamba(embed_dim=24, depth=1, patch_size=8, stride=8, img_size=32, num_classes=10)
    out = checkpoint_filter_fn({"model": sd}, model)
    assert out["patch_embed.proj.weight"].shape == (24, 3, 8, 8) and out["pos_embed"].shape == (1, 17, 24)
    torch.testing.assert_close(out["pos_embed"][:, 8], sd["pos_embed"][:, 2])  # class token slot, middle
    model.load_state_dict(out)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_checkpoint_filter_errors():
    model = _tiny_model()
    sd = official_state_dict(TINY["embed_dim"], TINY["depth"])
    sd["pos_embed"] = sd["pos_embed"][:, :-1]  # 14 patch positions: no square grid
    with pytest.raises(ValueError, match="not a square grid"):
        checkpoint_filter_fn(sd, model)
    sd = official_state_dict(TINY["embed_dim"], TINY["depth"])
    sd["layers.0.mixer.gamma"] = torch.ones(TINY["embed_dim"])  # layer scale: not this architecture
    with pytest.raises(RuntimeError, match="gamma"):
        model.load_state_dict(checkpoint_filter_fn(sd, model))


# ---------------------------------------------------------------- interface


@pytest.mark.parametrize("size", [(16, 16), (24, 40), (56, 32)])
def test_forward_backward_any_grid(size):
    model = _tiny_model(depth=2).train()
    images = torch.randn(2, 3, *size, requires_grad=True)
    out = model(images)
    assert out.shape == (2, 10)
    n = (size[0] // 8) * (size[1] // 8)
    assert model.forward_features(images).shape == (2, n + 1, TINY["embed_dim"])
    out.square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert images.grad is not None


def test_stride8_forward():
    model = vim.vim_tiny_stride8(depth=1, embed_dim=16, num_classes=3)
    assert model(torch.randn(1, 3, 32, 40)).shape == (1, 3)  # 3 x 4 overlapping patches


def test_bad_input_errors():
    model = _tiny_model(depth=1)
    with pytest.raises(ValueError, match=r"height must be 8 \+ k \* 8.*got 20"):
        model(torch.randn(1, 3, 20, 24))
    with pytest.raises(ValueError, match=r"expected images of shape \(batch, 3, height, width\)"):
        model(torch.randn(1, 1, 24, 24))


def test_timm_interface():
    model = _tiny_model(depth=2)
    assert model.num_features == model.embed_dim == TINY["embed_dim"]
    names = dict(model.named_parameters())
    assert model.no_weight_decay() <= names.keys()
    import timm.models

    for coarse in (False, True):
        groups = timm.models.group_parameters(model, model.group_matcher(coarse=coarse))
        group_of = {n: i for i, group in groups.items() for n in group}
        assert group_of.keys() == names.keys()
        assert group_of["cls_token"] == group_of["pos_embed"] == group_of["patch_embed.proj.weight"] == 0
        assert 0 < group_of["layers.0.mixer.A_b_log"] < group_of["layers.1.mixer.A_b_log"] <= group_of["norm_f.weight"]
        assert group_of["layers.1.norm.weight"] == group_of["layers.1.mixer.out_proj.weight"]
    x = torch.randn(2, 3, 24, 40)
    model.reset_classifier(4)
    assert model(x).shape == (2, 4) and model.get_classifier().out_features == 4
    model.reset_classifier(0)
    assert model(x).shape == (2, TINY["embed_dim"])
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, global_pool="avg")


def test_grad_checkpointing_same_grads():
    images = torch.randn(2, 3, 24, 40)
    grads = []
    for enable in (False, True):
        torch.manual_seed(0)
        model = _tiny_model(drop_path_rate=0.3).train()
        model.set_grad_checkpointing(enable)
        torch.manual_seed(1)
        model(images).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6, msg=n)


def test_official_init():
    torch.manual_seed(0)
    model = VisionMamba(**{**TINY, "depth": 4}, num_classes=5)
    mixer = model.layers[0].mixer
    assert model.head.bias.abs().sum() == 0 and model.patch_embed.proj.bias.abs().sum() == 0
    assert 0.015 < model.pos_embed.std() < 0.025  # timm's trunc_normal_(std=.02), truncated at +-2 (absolute)
    # mamba-ssm's rescale: kaiming_uniform bound 1/sqrt(fan_in), divided by sqrt(depth)
    bound = 1 / math.sqrt(mixer.d_inner) / math.sqrt(4)
    assert mixer.out_proj.weight.abs().max() <= bound
    dt = F.softplus(mixer.dt_proj.bias)
    assert (dt >= 1e-3 - 1e-6).all() and (dt <= 0.1 + 1e-6).all()


def test_registered_in_zoo_and_timm():
    import timm

    assert {"vim_tiny", "vim_small", "vim_base"} <= set(zoo.list_models("vim*"))
    model = timm.create_model("vim_tiny", depth=1, embed_dim=16, num_classes=3)
    assert isinstance(model, VisionMamba) and model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    cfg = timm.data.resolve_data_config({}, model=timm.create_model("vim_small", pretrained=False, depth=1))
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bicubic"
