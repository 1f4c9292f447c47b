"""EfficientVMamba (TerryPei/EfficientVMamba): parameter counts, exactness against a re-statement of the
official forward, official checkpoint conversion, features_only."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F

from zoo.core.selective_scan import selective_scan_naive
from zoo.models.vision.efficient_vmamba import EfficientVMamba, atrous_merge, atrous_split, checkpoint_filter_fn
from zoo.registry import create_model

TINY = dict(depths=(1, 2, 1, 1), dims=16, ssm_d_state=4)


def official_state_dict(depths, C0, d_state, in_chans=3, classes=10, seed=0):
    """Random tensors under the official key names and shapes (EfficientVSSM, ssm_ratio 2, two SSM stages)."""
    g = torch.Generator().manual_seed(seed)
    dims = [C0 * 2**i for i in range(len(depths))]

    def rnd(*shape, scale=0.3):
        return torch.randn(*shape, generator=g) * scale

    def norm(p, c):
        sd[p + "weight"], sd[p + "bias"] = 1 + rnd(c, scale=0.1), rnd(c, scale=0.1)

    def bn(p, c):
        norm(p, c)
        sd[p + "running_mean"], sd[p + "running_var"] = rnd(c, scale=0.1), 1 + torch.rand(c, generator=g)
        sd[p + "num_batches_tracked"] = torch.tensor(100)

    def conv(p, cout, cin, k, bias=True, scale=0.3):
        sd[p + "weight"] = rnd(cout, cin, k, k, scale=scale)
        if bias:
            sd[p + "bias"] = rnd(cout, scale=0.1)

    sd = {}
    conv("patch_embed.0.", C0, in_chans, 4, scale=0.2)
    norm("patch_embed.2.", C0)
    for i, (depth, C) in enumerate(zip(depths, dims)):
        if i < 2:
            E, R, r = 2 * C, math.ceil(C / 16), int(C * 0.125)
            for j in range(depth):
                p = f"layers.{i}.blocks.{j}."
                norm(p + "norm.", C)
                sd[p + "op.in_proj.weight"] = rnd(2 * E, C)
                conv(p + "op.conv2d.", E, 1, 3)
                sd[p + "op.x_proj_weight"] = rnd(4, R + 2 * d_state, E)
                sd[p + "op.dt_projs_weight"] = rnd(4, E, R)
                sd[p + "op.dt_projs_bias"] = rnd(4, E) - 2
                sd[p + "op.A_logs"] = torch.log(torch.arange(1, d_state + 1.0)).repeat(4 * E, 1) + rnd(4 * E, d_state, scale=0.1)
                sd[p + "op.Ds"] = 1 + rnd(4 * E)
                norm(p + "op.out_norm.", E)
                sd[p + "op.out_proj.weight"] = rnd(C, E)
                conv(p + "conv_branch.0.", C, 1, 3)
                bn(p + "conv_branch.1.", C)
                conv(p + "conv_branch.3.", C, C, 1, scale=0.2)
                norm(p + "se.norm.", C)
                sd[p + "se.global_reduce.weight"], sd[p + "se.global_reduce.bias"] = rnd(r, C), rnd(r)
                sd[p + "se.channel_select.weight"], sd[p + "se.channel_select.bias"] = rnd(C, r), rnd(C)
            down = f"layers.{i}.downsample."
        else:
            mid = 4 * C
            for j in range(1, depth + 1):
                p = f"layers.{i}.{j}."
                conv(p + "conv_pw.0.", mid, C, 1, bias=False, scale=0.2)
                bn(p + "conv_pw.1.", mid)
                conv(p + "conv_dw.0.", mid, 1, 3, bias=False)
                bn(p + "conv_dw.1.", mid)
                conv(p + "se.conv_reduce.", mid // 8, mid, 1, scale=0.1)
                conv(p + "se.conv_expand.", mid, mid // 8, 1)
                conv(p + "conv_pw2.0.", C, mid, 1, bias=False, scale=0.1)
                bn(p + "conv_pw2.1.", C)
            down = f"layers.{i}.{depth + 2}."
        if i < len(depths) - 1:
            sd[down + "reduction.weight"] = rnd(dims[i + 1], 4 * C, scale=0.1)
            norm(down + "norm.", 4 * C)
    norm("classifier.norm.", dims[-1])
    sd["classifier.head.weight"], sd["classifier.head.bias"] = rnd(classes, dims[-1]), rnd(classes)
    return sd


# ---------------------------------------------------------------- the official forward, restated
# Channels-last like the official code; the atrous scan as its strided slices of the padded map, one
# sequential scan per direction and strided writes back; batch norms in eval mode.

def _ln(x, sd, p):
    return F.layer_norm(x, (x.shape[-1],), sd[p + "weight"], sd[p + "bias"], 1e-5)


def _bn(x, sd, p):
    return F.batch_norm(x, sd[p + "running_mean"], sd[p + "running_var"], sd[p + "weight"], sd[p + "bias"], False, 0.0, 1e-5)


def _conv(x, sd, p, **kw):
    return F.conv2d(x, sd[p + "weight"], sd.get(p + "bias"), **kw)


def _official_atrous_ss2d(x, sd, p, d_state):
    xz = F.linear(x, sd[p + "in_proj.weight"])
    x, z = xz.chunk(2, dim=-1)
    z = F.silu(z)
    x = F.silu(_conv(x.permute(0, 3, 1, 2), sd, p + "conv2d.", padding=1, groups=x.shape[-1]))  # (b, D, H, W)
    b, D, H, W = x.shape
    x = F.pad(x, (0, W % 2, 0, H % 2))
    hs, ws = x.shape[2] // 2, x.shape[3] // 2
    xt = x.transpose(2, 3)
    xs = torch.stack([
        x[:, :, ::2, ::2].reshape(b, D, -1), xt[:, :, ::2, 1::2].reshape(b, D, -1),
        x[:, :, ::2, 1::2].reshape(b, D, -1), xt[:, :, 1::2, 1::2].reshape(b, D, -1),
    ], dim=1)  # (b, 4, D, L)
    N = d_state
    R = sd[p + "x_proj_weight"].shape[1] - 2 * N
    x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, sd[p + "x_proj_weight"])
    dts, Bs, Cs = x_dbl.split([R, N, N], dim=2)
    dts = torch.einsum("bkrl,kdr->bkdl", dts, sd[p + "dt_projs_weight"])
    As = -sd[p + "A_logs"].exp().view(4, D, N)
    Ds, bias = sd[p + "Ds"].view(4, D), sd[p + "dt_projs_bias"].view(4, D)
    ys = [
        selective_scan_naive(
            xs[:, k].transpose(1, 2), dts[:, k].transpose(1, 2), As[k], Bs[:, k].transpose(1, 2),
            Cs[:, k].transpose(1, 2), D=Ds[k], delta_bias=bias[k], delta_softplus=True,
        ).transpose(1, 2)
        for k in range(4)
    ]
    y = x.new_zeros(b, D, 2 * hs, 2 * ws)
    y[:, :, ::2, ::2] = ys[0].reshape(b, D, hs, ws)
    y[:, :, 1::2, ::2] = ys[1].reshape(b, D, ws, hs).transpose(2, 3)
    y[:, :, ::2, 1::2] = ys[2].reshape(b, D, hs, ws)
    y[:, :, 1::2, 1::2] = ys[3].reshape(b, D, ws, hs).transpose(2, 3)
    y = y[:, :, :H, :W].permute(0, 2, 3, 1)
    y = _ln(y, sd, p + "out_norm.") * z
    return F.linear(y, sd[p + "out_proj.weight"])


def _official_biattn(x, sd, p):
    g = _ln(x, sd, p + "norm.").mean(dim=(1, 2), keepdim=True)
    g = F.gelu(F.linear(g, sd[p + "global_reduce.weight"], sd[p + "global_reduce.bias"]))
    return x * torch.sigmoid(F.linear(g, sd[p + "channel_select.weight"], sd[p + "channel_select.bias"]))


def _official_ir(x, sd, p):
    h = F.relu(_bn(_conv(x, sd, p + "conv_pw.0."), sd, p + "conv_pw.1."))
    h = F.relu(_bn(_conv(h, sd, p + "conv_dw.0.", padding=1, groups=h.shape[1]), sd, p + "conv_dw.1."))
    s = F.relu(_conv(h.mean(dim=(2, 3), keepdim=True), sd, p + "se.conv_reduce."))
    h = h * torch.sigmoid(_conv(s, sd, p + "se.conv_expand."))
    return x + _bn(_conv(h, sd, p + "conv_pw2.0."), sd, p + "conv_pw2.1.")


def _official_patch_merging(x, sd, p):
    H, W = x.shape[1:3]
    x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
    x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
    return F.linear(_ln(x, sd, p + "norm."), sd[p + "reduction.weight"])


def official_forward(sd, images, depths, d_state):
    """Logits and the per-stage outputs (before each downsample, NCHW) of the official EfficientVSSM."""
    x = _ln(_conv(images, sd, "patch_embed.0.", stride=4).permute(0, 2, 3, 1), sd, "patch_embed.2.")
    stages = []
    for i, depth in enumerate(depths):
        if i < 2:
            for j in range(depth):
                p = f"layers.{i}.blocks.{j}."
                h = _ln(x, sd, p + "norm.")
                x_ssm = _official_atrous_ss2d(h, sd, p + "op.", d_state)
                c = _conv(h.permute(0, 3, 1, 2), sd, p + "conv_branch.0.", padding=1, groups=h.shape[-1])
                c = _conv(F.gelu(_bn(c, sd, p + "conv_branch.1.")), sd, p + "conv_branch.3.").permute(0, 2, 3, 1)
                x = x + _official_biattn(x_ssm, sd, p + "se.") + _official_biattn(c, sd, p + "se.")
            down = f"layers.{i}.downsample."
        else:
            x = x.permute(0, 3, 1, 2)
            for j in range(1, depth + 1):
                x = _official_ir(x, sd, f"layers.{i}.{j}.")
            x = x.permute(0, 2, 3, 1)
            down = f"layers.{i}.{depth + 2}."
        stages.append(x.permute(0, 3, 1, 2))
        if i < len(depths) - 1:
            x = _official_patch_merging(x, sd, down)
    x = _ln(x, sd, "classifier.norm.").mean(dim=(1, 2))
    return F.linear(x, sd["classifier.head.weight"], sd["classifier.head.bias"]), stages


def _tiny(**kwargs):
    torch.manual_seed(0)
    return EfficientVMamba(**{**TINY, "num_classes": 10, **kwargs})


def _assert_close(ours, ref):
    scale = ref.abs().max().item()
    err = (ours - ref).abs().max().item()
    assert err <= 2e-5 * max(scale, 1.0), f"max abs error {err:.3g} at output scale {scale:.3g}"


@pytest.mark.parametrize("name, params, paper_m", [
    ("efficient_vmamba_tiny", 6_493_660, 6),  # training logs: 6.494 M, 11.274 M, 33.717 M
    ("efficient_vmamba_small", 11_273_688, 11),
    ("efficient_vmamba_base", 33_717_136, 33),
])
def test_param_counts_match_official(name, params, paper_m):
    with torch.device("meta"):
        model = create_model(name)
    n = sum(p.numel() for p in model.parameters())
    assert n == params and int(n / 1e6) == paper_m  # the README table truncates to millions


@pytest.mark.parametrize("size", [(44, 52), (64, 36)])  # 11 x 13 tokens (odd: padded atrous subgrids), 16 x 9
def test_forward_matches_official(size):
    sd = official_state_dict(TINY["depths"], TINY["dims"], TINY["ssm_d_state"])
    model = _tiny().eval()
    model.load_state_dict(checkpoint_filter_fn(sd, model), strict=True)
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    logits, stages = official_forward(sd, images, TINY["depths"], TINY["ssm_d_state"])
    with torch.no_grad():
        _assert_close(model(images), logits)
        for ours, ref in zip(model.forward_intermediates(images, intermediates_only=True), stages):
            assert ours.shape == ref.shape
            _assert_close(ours, ref)


@pytest.mark.parametrize("hw", [(4, 6), (5, 7), (1, 3)])
def test_atrous_split_merge_roundtrip(hw):
    x = torch.randn(2, *hw, 3)
    parts = atrous_split(x)
    assert parts.shape == (4, 2, math.ceil(hw[0] / 2) * math.ceil(hw[1] / 2), 3)
    assert torch.equal(parts[1, :, 0], x[:, 1, 0] if hw[0] > 1 else torch.zeros(2, 3))  # odd row, even column
    assert torch.equal(atrous_merge(parts, hw), x)


def test_official_checkpoint_loads_strictly(tmp_path):
    sd = official_state_dict(TINY["depths"], TINY["dims"], TINY["ssm_d_state"], classes=1000)
    path = tmp_path / "efficient_vmamba_tiny.ckpt"
    # As the EMA of a DDP model is saved: a "state_dict" with doubled "module." prefixes.
    torch.save({"state_dict": {"module.module." + k: v for k, v in sd.items()}}, path)
    model = create_model("efficient_vmamba_tiny", checkpoint_path=str(path), **TINY)
    assert torch.equal(model.stages[3].downsample.reduction.weight, sd["layers.2.3.reduction.weight"])
    assert torch.equal(model.stages[2].blocks[0].conv_pw2[1].running_var, sd["layers.2.1.conv_pw2.1.running_var"])
    headless = create_model("efficient_vmamba_tiny", checkpoint_path=str(path), num_classes=0, **TINY)
    assert headless.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 128)


@pytest.mark.parametrize("size", [(33, 47), (16, 16)])
def test_forward_backward_any_size(size):
    model = _tiny()
    images = torch.randn(2, 3, *size, requires_grad=True)
    out = model(images)
    assert out.shape == (2, 10)
    out.square().mean().backward()
    assert torch.isfinite(images.grad).all()
    assert all(p.grad is not None for p in model.parameters())


def test_features_only_and_timm():
    model = timm.create_model("efficient_vmamba_tiny", features_only=True, **TINY)
    feats = model(torch.randn(1, 3, 44, 52))
    assert [tuple(f.shape) for f in feats] == [(1, 16, 11, 13), (1, 32, 6, 7), (1, 64, 3, 4), (1, 128, 2, 2)]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    cfg = timm.data.resolve_data_config({}, model=timm.create_model("efficient_vmamba_small", **TINY))
    assert cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bicubic"
    clf = _tiny(drop_path_rate=0.0)
    groups = timm.models.group_parameters(clf, clf.group_matcher())
    assert sum(len(g) for g in groups.values()) == len(list(clf.parameters()))
    clf.set_grad_checkpointing(True)
    clf(torch.randn(2, 3, 32, 32)).sum().backward()
