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


# ---------------------------------------------------------------- torch.compile(fullgraph=True)

def _compiled_matches_eager(model, *inputs, atol=1e-5):
    """fullgraph compile (aot_eager), forward equal to eager, backward reaching every parameter."""
    torch._dynamo.reset()
    model.eval()  # no dropout / drop-path draws: compiled and eager outputs comparable
    ref = model(*inputs)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(*inputs)
    assert out.shape == ref.shape and torch.allclose(out, ref, atol=atol), (out - ref).abs().max()
    out.float().square().sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    return compiled


_CFG_ATTRS = {"training", "pretrained_cfg", "default_cfg", "pretrained_model_args"}  # name the entry, not the model


def _signature(model):
    """Every module's type and plain attributes, and every parameter's and buffer's shape: two models equal here run
    the same code, so dynamo traces the same graph for both."""
    parts = [(name, type(m).__qualname__, sorted((k, repr(v)) for k, v in vars(m).items() if not k.startswith("_")
                                                  and k not in _CFG_ATTRS and not isinstance(v, (torch.Tensor, torch.nn.Module))))
             for name, m in model.named_modules()]
    return repr(parts + [(k, tuple(t.shape)) for k, t in model.state_dict().items()])


def _distinct_vision_builds():
    """The vision entries grouped by their tiny build's signature (the tiny configs override the sizes, so e.g. all
    Vim sizes build the same tiny model): one compile per group keeps CI's two cores under their time budget."""
    groups = {}
    for name in VISION_ENTRIES:
        groups.setdefault(_signature(_vision(name)), []).append(name)
    return list(groups.values())


@pytest.mark.parametrize("names", _distinct_vision_builds(), ids="+".join)
def test_vision_entry_compiles_fullgraph(names):
    _compiled_matches_eager(_vision(names[0]), torch.randn(2, 3, IMG, IMG))


def test_vision_builds_are_grouped_by_what_differs():
    """The grouping above is not vacuous: a change of one flag deep inside a model separates two builds."""
    a, b = _vision("vmamba_tiny"), _vision("vmamba_tiny")
    assert _signature(a) == _signature(b)
    next(m for m in b.modules() if hasattr(m, "forward_type") or hasattr(m, "d_state")).__dict__["probe_flag"] = 1
    assert _signature(a) != _signature(b)
    assert len(_distinct_vision_builds()) >= 3  # Vim, VMamba and EfficientVMamba at least


def test_short_sequence_backward_compiles():
    """The CPU scan's backward under AOTAutograd for sequences under 16 steps (one chunk): it failed in a view
    (AOT predicted other strides for the step-major gradients than eager gives) until the chunked scan handed
    its gradients back batch-major."""
    from zoo.core.mamba import Mamba

    torch.manual_seed(0)
    _compiled_matches_eager(Mamba(16, d_state=4), torch.randn(2, 7, 16))


def test_smamba_compiles_fullgraph():
    torch.manual_seed(0)
    model = zoo.create_model("smamba_etth1", seq_len=12, pred_len=5, d_model=16, d_state=4, d_ff=24, e_layers=2)
    _compiled_matches_eager(model, torch.randn(2, 12, 7))  # 7 variate tokens: a short sequence


@pytest.mark.parametrize("name, kwargs", [
    ("mamba_130m", dict(d_model=32, n_layer=2)),
    ("mamba2attn_2_7b", dict(d_model=32, n_layer=2, attn_layer_idx=[1], ssm_cfg=dict(layer="Mamba2", headdim=16, d_state=8,
                                                                                     chunk_size=8),
                             attn_cfg=dict(causal=True, head_dim=16, num_heads=2, rotary_emb_dim=8))),
])
def test_language_models_compile_fullgraph(name, kwargs):
    """The language models' forward (logits of a batch of token ids), Mamba-1 and the Mamba-2 + attention hybrid."""
    torch.manual_seed(0)
    compiled = _compiled_matches_eager(zoo.create_model(name, **kwargs), torch.randint(0, 100, (2, 9)))
    with pytest.raises(RuntimeError, match="token ids must be in"):  # the range check runs inside the graph
        compiled(torch.full((2, 9), 10**6))


_POINTS = torch.randn(2, 64, 3)
POINT_COMPILE = [
    ("pointmamba_tiny", dict(num_classes=5, trans_dim=32, depth=2, num_group=8, group_size=8, head_hidden=16)),
    ("pcm_tiny_modelnet40", dict(num_classes=4, embed_dim=16, dim_expansion=(1, 2), pre_blocks=(1, 1),
                                 mamba_blocks=(1, 2), k_neighbors=(4, 4), reducers=(1, 2), orders=("xyz", "hilbert", "zyx"),
                                 prompt_num_per_order=2, prompt_dim=8)),
]


@pytest.mark.parametrize("name, kwargs", POINT_COMPILE)
def test_point_models_compile_fullgraph(name, kwargs):
    """Point counts and finiteness are asserted inside the graph under torch.compile (the eager checks read values
    to word their errors), and the Hilbert curve's loops run to MAX_DEPTH there (the per-cloud depth masks the
    levels above a cloud's own: the same codes): no data-dependent graph break is left. The compiled model still
    refuses a non-finite point."""
    torch.manual_seed(0)
    model = zoo.create_model(name, **kwargs)
    compiled = _compiled_matches_eager(model, _POINTS)
    bad = _POINTS.clone()
    bad[1, 5, 0] = float("nan")
    with pytest.raises(RuntimeError, match="expected finite coordinates"):
        compiled(bad)
    with pytest.raises(ValueError, match="expected finite coordinates, got .* at cloud 1, point 5"):
        model(bad)  # eager: the detailed message


_BAGS = torch.randn(2, 5, 12)  # 5 instances, SR-Mamba rate 3: each bag is padded to 6 for its reordered scan


def test_mambamil_equal_size_bags_compile_fullgraph():
    """Equal-size bags (b, n, feat) run through the layers as a batch (SR-Mamba's reordering a reshape), not packed
    by cu_seqlens: the same outputs as the packed path, and one graph."""
    torch.manual_seed(0)
    model = zoo.create_model("mambamil", in_dim=12, embed_dim=16, rate=3, num_classes=3).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(_BAGS), model(list(_BAGS)), rtol=1e-5, atol=1e-6)  # batched == packed
    _compiled_matches_eager(model, _BAGS)


_UNEQUAL_BAGS = [torch.randn(5, 12), torch.randn(7, 12)]


@pytest.mark.xfail(strict=True, raises=Exception, reason=(
    "bags of different sizes are packed with cu_seqlens: the core scan reads the boundaries to the host "
    "(check_scan_args: cu_seqlens.tolist()) and SR-Mamba's reordering pads each bag to a multiple of rate, its "
    "total length int(cu_padded[-1]) read from them: data-dependent shapes"))
def test_mambamil_packed_bags_do_not_compile_fullgraph():
    torch.manual_seed(0)
    model = zoo.create_model("mambamil", in_dim=12, embed_dim=16, rate=3, num_classes=3)
    _compiled_matches_eager(model, _UNEQUAL_BAGS)


def test_mambamil_packed_bags_compile_with_graph_breaks():
    torch.manual_seed(0)
    model = zoo.create_model("mambamil", in_dim=12, embed_dim=16, rate=3, num_classes=3, depth=1).eval()
    torch._dynamo.reset()
    ref = model(_UNEQUAL_BAGS)
    out = torch.compile(model, backend="aot_eager")(_UNEQUAL_BAGS)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_mamba_kws_compiles_fullgraph():
    """Whole waveforms (no num_samples): frame counts come from the shape and the Mamba layers run on the batch as it
    is, not packed by frame counts, so nothing reads a value."""
    torch.manual_seed(0)
    model = zoo.create_model("mamba_kws_tiny", depth=2)
    _compiled_matches_eager(model, torch.randn(2, 4000))


_SPEECH_LENGTHS = (torch.randn(2, 4000), torch.tensor([4000, 3000]))


@pytest.mark.xfail(strict=True, raises=Exception, reason=(
    "with num_samples the output's length is the longest utterance's frame count, int(frames.max()), and the Mamba "
    "layers run on the valid frames packed by cu_seqlens (x[mask]): data-dependent output and intermediate shapes"))
def test_mamba_kws_with_lengths_does_not_compile_fullgraph():
    torch.manual_seed(0)
    _compiled_matches_eager(zoo.create_model("mamba_kws_tiny", depth=2), *_SPEECH_LENGTHS)


def test_mamba_kws_with_lengths_compiles_with_graph_breaks():
    torch.manual_seed(0)
    model = zoo.create_model("mamba_kws_tiny", depth=1).eval()
    torch._dynamo.reset()
    ref = model(*_SPEECH_LENGTHS)
    out = torch.compile(model, backend="aot_eager")(*_SPEECH_LENGTHS)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------- TorchScript and torch.fx
# timm's tests/test_models.py keeps fnmatch filter lists (EXCLUDE_JIT_FILTERS, EXCLUDE_FX_FILTERS) of models its
# torch.jit.script and FX tests skip. The same idea here, decided per family; the test checks that an excluded
# entry does fail, so a list entry goes stale loudly once a family becomes scriptable or traceable.
#
# TorchScript, all three vision families: every mixer runs the core selective scan, which is a
# torch.autograd.Function (the chunked CPU scan's hand-written backward) or a Triton custom op chosen at run time
# by device (selective_scan.op._resolve returns Python functions); TorchScript compiles neither, nor the
# shape-formatting input checks (f-strings of tuple(x.shape)). torch.compile / torch.export are the routes.
EXCLUDE_JIT_FILTERS = ["vim_*", "vmamba_*", "efficient_vmamba_*"]
# torch.fx symbolic tracing, all three: forward takes Python branches on shapes (the patch embeds' and mixers'
# input checks, the scan's chunk count, the CPU scan's Python loop over the sequence), which FX proxies cannot
# decide. timm's FX feature route would need the mixers registered as leaf (no-trace) modules and traceable
# checks; torch.compile (dynamo, tested above) captures the whole graph instead.
EXCLUDE_FX_FILTERS = ["vim_*", "vmamba_*", "efficient_vmamba_*"]


def _excluded(name, filters):
    import fnmatch
    return any(fnmatch.fnmatch(name, f) for f in filters)


@pytest.mark.parametrize("name", VISION_ENTRIES)
def test_torchscript(name):
    model = _vision(name).eval()
    if _excluded(name, EXCLUDE_JIT_FILTERS):
        with pytest.raises(Exception):  # TorchScript's frontend errors have no one class
            torch.jit.script(model)
        return
    x = torch.randn(2, 3, IMG, IMG)
    assert torch.allclose(torch.jit.script(model)(x), model(x), atol=1e-5)


@pytest.mark.parametrize("name", VISION_ENTRIES)
def test_fx_trace(name):
    model = _vision(name).eval()
    if _excluded(name, EXCLUDE_FX_FILTERS):
        with pytest.raises(torch.fx.proxy.TraceError, match="control flow"):
            torch.fx.symbolic_trace(model)
        return
    x = torch.randn(2, 3, IMG, IMG)
    assert torch.allclose(torch.fx.symbolic_trace(model)(x), model(x), atol=1e-5)
