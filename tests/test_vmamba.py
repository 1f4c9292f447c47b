"""VMamba (MzeroMiko/VMamba v2 models): parameter counts, exactness against a re-statement of the official
forward, official checkpoint conversion, features_only, and the timm interface."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F

from zoo.core.selective_scan import selective_scan_naive
from zoo.models.vision import vmamba
from zoo.models.vision.vmamba import VMamba, checkpoint_filter_fn, cross_merge, cross_scan
from zoo.registry import create_model

TINY = dict(depths=(1, 2, 1, 1), dims=8, ssm_ratio=2.0)


def official_param_count(depths, C0, ssm_ratio, d_state=1, mlp_ratio=4, in_chans=3, classes=1000):
    """Parameters of the official VSSM ("v05_noz", conv 3 without bias, v2 stem, v3 downsample)."""
    dims = [C0 * 2**i for i in range(4)]

    def block(C):
        E, R, H = int(ssm_ratio * C), math.ceil(C / 16), int(mlp_ratio * C)
        ss2d = C * E + 9 * E + 4 * (R + 2 * d_state) * E + 4 * E * R + 4 * E + 4 * E * d_state + 4 * E + 2 * E + E * C
        return 2 * C + ss2d + 2 * C + (C * H + H) + (H * C + C)

    stem = (in_chans * 9 * C0 // 2 + C0 // 2) + C0 + (C0 // 2 * 9 * C0 + C0) + 2 * C0
    downs = sum(9 * a * b + b + 2 * b for a, b in zip(dims, dims[1:]))
    head = 2 * dims[-1] + dims[-1] * classes + classes
    return stem + sum(d * block(C) for d, C in zip(depths, dims)) + downs + head


def official_state_dict(depths, C0, ssm_ratio=2.0, d_state=1, in_chans=3, classes=10, seed=0):
    """Random tensors under the official key names and shapes (VSSM with norm_layer="ln2d")."""
    g = torch.Generator().manual_seed(seed)
    dims = [C0 * 2**i for i in range(len(depths))]

    def rnd(*shape, scale=0.3):
        return torch.randn(*shape, generator=g) * scale

    def norm(p, c):
        sd[p + "weight"], sd[p + "bias"] = 1 + rnd(c, scale=0.1), rnd(c, scale=0.1)

    sd = {}
    sd["patch_embed.0.weight"], sd["patch_embed.0.bias"] = rnd(C0 // 2, in_chans, 3, 3), rnd(C0 // 2)
    norm("patch_embed.2.", C0 // 2)
    sd["patch_embed.5.weight"], sd["patch_embed.5.bias"] = rnd(C0, C0 // 2, 3, 3, scale=0.2), rnd(C0)
    norm("patch_embed.7.", C0)
    for i, (depth, C) in enumerate(zip(depths, dims)):
        E, R = int(ssm_ratio * C), math.ceil(C / 16)
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            norm(p + "norm.", C)
            sd[p + "op.in_proj.weight"] = rnd(E, C)
            sd[p + "op.conv2d.weight"] = rnd(E, 1, 3, 3)
            sd[p + "op.x_proj_weight"] = rnd(4, R + 2 * d_state, E)
            sd[p + "op.dt_projs_weight"] = rnd(4, E, R)
            sd[p + "op.dt_projs_bias"] = rnd(4, E) - 2
            sd[p + "op.A_logs"] = torch.log(torch.arange(1, d_state + 1.0)).repeat(4 * E, 1) + rnd(4 * E, d_state, scale=0.1)
            sd[p + "op.Ds"] = 1 + rnd(4 * E)
            norm(p + "op.out_norm.", E)
            sd[p + "op.out_proj.weight"] = rnd(C, E)
            norm(p + "norm2.", C)
            sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = rnd(4 * C, C), rnd(4 * C)
            sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = rnd(C, 4 * C, scale=0.1), rnd(C)
        if i < len(depths) - 1:
            p = f"layers.{i}.downsample."
            sd[p + "1.weight"], sd[p + "1.bias"] = rnd(dims[i + 1], C, 3, 3, scale=0.1), rnd(dims[i + 1])
            norm(p + "3.", dims[i + 1])
    norm("classifier.norm.", dims[-1])
    sd["classifier.head.weight"], sd["classifier.head.bias"] = rnd(classes, dims[-1]), rnd(classes)
    return sd


# ---------------------------------------------------------------- the official forward, restated
# Channels-first as the official "ln2d" models; Linear2d as a 1x1 convolution; the cross-scan as explicit
# transposes and flips of four copies; one sequential scan per direction.

def _ln2d(x, sd, p):
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), sd[p + "weight"], sd[p + "bias"], 1e-5).permute(0, 3, 1, 2)


def _linear2d(x, weight, bias=None):
    return F.conv2d(x, weight[:, :, None, None], bias)


def _official_ss2d(x, sd, p, d_state):
    x = _linear2d(x, sd[p + "in_proj.weight"])
    x = F.silu(F.conv2d(x, sd[p + "conv2d.weight"], padding=1, groups=x.shape[1]))
    b, D, H, W = x.shape
    N = d_state
    R = sd[p + "x_proj_weight"].shape[1] - 2 * N
    xs = torch.stack([x.flatten(2), x.transpose(2, 3).flatten(2)], dim=1)
    xs = torch.cat([xs, xs.flip(-1)], dim=1)  # (b, 4, D, L)
    x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, sd[p + "x_proj_weight"])
    dts, Bs, Cs = x_dbl.split([R, N, N], dim=2)
    dts = torch.einsum("bkrl,kdr->bkdl", dts, sd[p + "dt_projs_weight"])
    As = -sd[p + "A_logs"].exp().view(4, D, N)
    Ds, bias = sd[p + "Ds"].view(4, D), sd[p + "dt_projs_bias"].view(4, D)
    ys = torch.stack([
        selective_scan_naive(
            xs[:, k].transpose(1, 2), dts[:, k].transpose(1, 2), As[k], Bs[:, k].transpose(1, 2),
            Cs[:, k].transpose(1, 2), D=Ds[k], delta_bias=bias[k], delta_softplus=True,
        ).transpose(1, 2)
        for k in range(4)
    ], dim=1)
    y = ys[:, 0:2] + ys[:, 2:4].flip(-1)
    y = y[:, 0] + y[:, 1].reshape(b, D, W, H).transpose(2, 3).flatten(2)
    y = _ln2d(y.reshape(b, D, H, W), sd, p + "out_norm.")
    return _linear2d(y, sd[p + "out_proj.weight"])


def official_forward(sd, images, depths, d_state=1):
    """Logits and the per-stage outputs (before each downsample) of the official VSSM."""
    x = F.conv2d(images, sd["patch_embed.0.weight"], sd["patch_embed.0.bias"], stride=2, padding=1)
    x = F.gelu(_ln2d(x, sd, "patch_embed.2."))
    x = F.conv2d(x, sd["patch_embed.5.weight"], sd["patch_embed.5.bias"], stride=2, padding=1)
    x = _ln2d(x, sd, "patch_embed.7.")
    stages = []
    for i, depth in enumerate(depths):
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            x = x + _official_ss2d(_ln2d(x, sd, p + "norm."), sd, p + "op.", d_state)
            h = F.gelu(_linear2d(_ln2d(x, sd, p + "norm2."), sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]))
            x = x + _linear2d(h, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        stages.append(x)
        if i < len(depths) - 1:
            p = f"layers.{i}.downsample."
            x = _ln2d(F.conv2d(x, sd[p + "1.weight"], sd[p + "1.bias"], stride=2, padding=1), sd, p + "3.")
    x = _ln2d(x, sd, "classifier.norm.").mean(dim=(2, 3))
    return F.linear(x, sd["classifier.head.weight"], sd["classifier.head.bias"]), stages


def _tiny(**kwargs):
    torch.manual_seed(0)
    return VMamba(**{**TINY, "num_classes": 10, **kwargs})


def _assert_close(ours, ref):
    scale = ref.abs().max().item()
    err = (ours - ref).abs().max().item()
    assert err <= 2e-5 * max(scale, 1.0), f"max abs error {err:.3g} at output scale {scale:.3g}"


# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize("name, depths, dim, ratio, paper_m", [
    ("vmamba_tiny", (2, 2, 8, 2), 96, 1.0, 30),
    ("vmamba_small", (2, 2, 15, 2), 96, 2.0, 50),
    ("vmamba_base", (2, 2, 15, 2), 128, 2.0, 89),
    ("vmamba_tiny_s2l5", (2, 2, 5, 2), 96, 2.0, 31),
    ("vmamba_small_s1l20", (2, 2, 20, 2), 96, 1.0, 49),
    ("vmamba_base_s1l20", (2, 2, 20, 2), 128, 1.0, 87),
])
def test_param_counts_match_official(name, depths, dim, ratio, paper_m):
    with torch.device("meta"):
        model = create_model(name)
    n = sum(p.numel() for p in model.parameters())
    assert n == official_param_count(depths, dim, ratio)
    assert round(n / 1e6) == paper_m  # the README table, rounded to millions


# ---------------------------------------------------------------- exactness


@pytest.mark.parametrize("ratio, d_state, size", [(2.0, 1, (36, 44)), (1.0, 2, (29, 23))])
def test_forward_matches_official(ratio, d_state, size):
    sd = official_state_dict(TINY["depths"], TINY["dims"], ratio, d_state)
    model = _tiny(ssm_ratio=ratio, ssm_d_state=d_state).eval()
    missing, unexpected = model.load_state_dict(checkpoint_filter_fn({"model": sd}, model), strict=True)
    assert not missing and not unexpected
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    logits, stages = official_forward(sd, images, TINY["depths"], d_state)
    with torch.no_grad():
        _assert_close(model(images), logits)
        for ours, ref in zip(model.forward_intermediates(images, intermediates_only=True), stages):
            assert ours.shape == ref.shape
            _assert_close(ours, ref)


def test_cross_scan_matches_four_flipped_scans():
    g = torch.Generator().manual_seed(2)
    b, H, W, d, n = 2, 3, 5, 4, 2
    L = H * W
    u = torch.randn(b, L, d, generator=g)
    delta = torch.randn(4, b, L, d, generator=g)
    A = -torch.rand(4, d, n, generator=g) - 0.5
    B, C = torch.randn(4, b, L, n, generator=g), torch.randn(4, b, L, n, generator=g)
    D, bias = torch.randn(4, d, generator=g), torch.randn(4, d, generator=g)
    ys = cross_scan(u, delta, A, B, C, D, bias, (H, W))
    # Direction k, written out: gather its token order, scan forward, scatter back.
    rows = torch.arange(L)
    cols = torch.arange(L).view(H, W).t().reshape(-1)
    for k, order in enumerate([rows, cols, rows.flip(0), cols.flip(0)]):
        y = selective_scan_naive(
            u[:, order], delta[k][:, order], A[k], B[k][:, order], C[k][:, order], D=D[k], delta_bias=bias[k],
            delta_softplus=True,
        )
        ref = torch.empty_like(y)
        ref[:, order] = y
        _assert_close(ys[k], ref)
    _assert_close(cross_merge(ys), ys[0] + ys[1] + ys[2] + ys[3])


# ---------------------------------------------------------------- checkpoints


def test_official_checkpoint_loads_strictly(tmp_path):
    sd = official_state_dict(TINY["depths"], TINY["dims"], classes=1000)
    path = tmp_path / "vssm1_tiny_ckpt.pth"
    torch.save({"model": sd, "max_accuracy": 82.6, "epoch": 264}, path)
    model = create_model("vmamba_tiny", checkpoint_path=str(path), **TINY)
    assert torch.equal(model.stages[1].downsample.conv.weight, sd["layers.0.downsample.1.weight"])
    assert torch.equal(model.head.weight, sd["classifier.head.weight"])
    assert model.pretrained_cfg["architecture"] == "vmamba_tiny"


def test_checkpoint_head_adaptation():
    sd = official_state_dict(TINY["depths"], TINY["dims"], classes=1000)
    model = _tiny(num_classes=7)
    converted = checkpoint_filter_fn(sd, model)
    assert converted["head.weight"].shape == (7, 64)
    model.load_state_dict(converted, strict=True)
    headless = _tiny(num_classes=0)
    headless.load_state_dict(checkpoint_filter_fn(sd, headless), strict=True)
    assert headless(torch.randn(1, 3, 32, 32)).shape == (1, 64)


def test_checkpoint_of_other_architecture_fails_strict_loading():
    sd = official_state_dict(TINY["depths"], TINY["dims"], ssm_ratio=2.0)
    model = _tiny(ssm_ratio=1.0)
    with pytest.raises(RuntimeError, match="size mismatch"):
        model.load_state_dict(checkpoint_filter_fn(sd, model), strict=True)
    sd["layers.0.blocks.0.op.x_proj_bias"] = torch.zeros(4, 8)  # a forward type with x_proj bias: not ours
    model = _tiny(ssm_ratio=2.0)
    with pytest.raises(RuntimeError, match="x_proj_bias"):
        model.load_state_dict(checkpoint_filter_fn(sd, model), strict=True)


# ---------------------------------------------------------------- any size, features, timm interface


@pytest.mark.parametrize("size", [(33, 47), (17, 64), (8, 8)])
def test_forward_backward_any_size(size):
    model = _tiny()
    images = torch.randn(2, 3, *size, requires_grad=True)
    out = model(images)
    assert out.shape == (2, 10)
    out.square().mean().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()
    assert all(p.grad is not None for p in model.parameters())


def test_features_only():
    model = vmamba.vmamba_tiny(features_only=True, **TINY, num_classes=10)
    feats = model(torch.randn(2, 3, 33, 47))
    assert [tuple(f.shape) for f in feats] == [(2, 8, 9, 12), (2, 16, 5, 6), (2, 32, 3, 3), (2, 64, 2, 2)]
    assert model.feature_info.channels() == [8, 16, 32, 64]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    two = timm.create_model("vmamba_tiny", features_only=True, out_indices=(1, 2), **TINY)
    assert [f.shape[1] for f in two(torch.randn(1, 3, 64, 64))] == [16, 32]
    assert len(two.model.stages) == 3  # pruned after the last stage asked for


def test_timm_interface():
    model = _tiny().eval()
    x = torch.randn(2, 3, 40, 40)
    feats = model.forward_features(x)
    assert feats.shape == (2, 2, 2, 64)  # channels-last, as model.output_fmt says
    assert model.forward_head(feats, pre_logits=True).shape == (2, 64)
    final, inter = model.forward_intermediates(x, indices=2)
    assert torch.allclose(final, feats) and [t.shape[1] for t in inter] == [32, 64]
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    groups = timm.models.group_parameters(model, model.group_matcher())
    assert sum(len(g) for g in groups.values()) == len(list(model.parameters()))
    assert model.no_weight_decay() == set()
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, global_pool="token")
    with pytest.raises(ValueError, match=r"expected images \(batch, 3, height, width\), got \(2, 4, 40, 40\)"):
        model(torch.randn(2, 4, 40, 40))


def test_grad_checkpointing_same_grads():
    model = _tiny(drop_path_rate=0.0)
    x = torch.randn(1, 3, 24, 24)
    model(x).sum().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for a, b in zip(ref, model.parameters()):
        assert torch.allclose(a, b.grad, atol=1e-6)


def test_official_init():
    model = _tiny()
    op = model.stages[0].blocks[0].op
    assert torch.equal(op.A_logs, torch.zeros(4 * op.d_inner, 1))  # log(1): A = -1 for d_state 1
    assert torch.equal(op.Ds, torch.ones(4 * op.d_inner))
    dt = F.softplus(op.dt_projs_bias)
    assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6
    assert op.x_proj_weight.abs().max() <= op.d_inner**-0.5
    assert model.head.bias.abs().max() == 0 and model.stages[0].blocks[0].norm.weight.eq(1).all()


def test_registered_with_pretrained_cfgs():
    names = set(timm.list_models("vmamba*"))
    assert {"vmamba_tiny", "vmamba_small", "vmamba_base"} <= names
    model = timm.create_model("vmamba_small", pretrained=False, **TINY)
    cfg = timm.data.resolve_data_config({}, model=model)
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bicubic"
    assert model.pretrained_cfg["url"].endswith("vssm_small_0229_ckpt_epoch_222.pth")
    assert model.pretrained_cfg["metrics"]["imagenet_top1"] == 83.6
