"""timm citizenship (issue 21): timm's feature routes, torch.compile(fullgraph=True), TorchScript and torch.fx.

Compile tests run on CPU (the selective scan's plain PyTorch path) with backend="aot_eager": dynamo traces the
whole model as one graph (fullgraph=True fails on any graph break) and AOTAutograd traces the backward, without
inductor's C++ code generation, which takes minutes on a small CPU.
"""
import pytest
import timm
import torch
import torch._dynamo

import zoo

IMG = 16
VISION = {  # tiny configs: seconds to compile
    "vim": dict(embed_dim=32, depth=2, img_size=IMG, patch_size=8, stride=8, num_classes=5),
    "vmamba": dict(depths=(1, 2, 1, 1), dims=8, ssm_ratio=2.0, num_classes=5),
    "efficient_vmamba": dict(depths=(1, 2, 1, 1), dims=16, ssm_d_state=4, num_classes=5),
}
VISION_ENTRIES = sorted(n for n in zoo.list_models() if n.split("_")[0] in ("vim", "vmamba") or n.startswith("efficient_vmamba"))


def _family(name):
    return "efficient_vmamba" if name.startswith("efficient_vmamba") else name.split("_")[0]


def _vision(name, **kw):
    torch.manual_seed(0)
    return timm.create_model(name, **{**VISION[_family(name)], **kw})


# ---------------------------------------------------------------- features_only / feature_cls

@pytest.mark.parametrize("name", ["vim_tiny", "vmamba_tiny", "efficient_vmamba_tiny"])
def test_features_only_getter_route(name):
    x = torch.randn(2, 3, IMG, IMG)
    default = _vision(name, features_only=True).eval()
    getter = _vision(name, features_only=True, feature_cls="getter").eval()
    assert type(getter).__name__ == "FeatureGetterNet" and type(default).__name__ == "FeatureGetterNet"
    maps, ref = getter(x), default(x)
    assert len(maps) == len(ref) == len(getter.feature_info) > 0
    assert all(torch.equal(a, b) for a, b in zip(maps, ref))
    assert [m.shape[1] for m in maps] == getter.feature_info.channels()
    # The class itself and a timm feature_cfg (as timm's builders take it) work too.
    from timm.models._features import FeatureGetterNet
    last = _vision(name, features_only=True, feature_cls=FeatureGetterNet, out_indices=1).eval()
    assert len(last(x)) == 1 and torch.equal(last(x)[0], ref[-1])
    cfg = _vision(name, features_only=True, feature_cfg=dict(feature_cls="getter", out_indices=(0,))).eval()
    assert len(cfg(x)) == 1 and torch.equal(cfg(x)[0], ref[0])


def test_features_only_output_fmt():
    x = torch.randn(2, 3, IMG, IMG)
    nchw = _vision("vmamba_tiny", features_only=True).eval()(x)
    nhwc = _vision("vmamba_tiny", features_only=True, feature_cls="getter", output_fmt="NHWC").eval()(x)
    assert all(torch.equal(a.permute(0, 2, 3, 1), b) for a, b in zip(nchw, nhwc))
    nlc = _vision("vim_tiny", features_only=True, output_fmt="NLC").eval()(x)
    assert nlc[0].shape == (2, (IMG // 8) ** 2, 32)


@pytest.mark.parametrize("feature_cls", ["hook", "list", "dict", "fx"])
def test_unsupported_feature_cls_is_a_clear_error(feature_cls):
    with pytest.raises(ValueError, match=f"feature_cls '{feature_cls}' is not supported.*'getter'"):
        _vision("vim_tiny", features_only=True, feature_cls=feature_cls)


def test_unknown_feature_cls_and_misuse():
    with pytest.raises(ValueError, match="unknown feature_cls 'gettr'.*getter"):
        _vision("vmamba_tiny", features_only=True, feature_cls="gettr")
    with pytest.raises(ValueError, match="feature_cls needs features_only=True"):
        _vision("vmamba_tiny", feature_cls="getter")
    with pytest.raises(ValueError, match="feature_cfg: unknown keys \\['bogus'\\]"):
        _vision("vmamba_tiny", features_only=True, feature_cfg=dict(bogus=1))
