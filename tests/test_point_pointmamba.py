"""PointMamba: the official forward restated, official checkpoint layout, registry entries, bad input."""
import pytest
import torch

from zoo.models.point.ops import group_points
from zoo.models.point.pointmamba import (
    FeaturePropagation, PointMamba, PointMambaMPM, PointMambaPartSeg, chamfer_l2, checkpoint_filter_fn,
    mpm_checkpoint_filter_fn,
)
from zoo.models.point.serialization import bit_length, hilbert_encode

SMALL = dict(num_classes=5, trans_dim=32, depth=2, num_group=8, group_size=8, head_hidden=16)


def _official_order(center, swap, grid_size=0.02):
    # Pointcept's batched serialization as PointMamba calls it: per-cloud min, batch-wide depth,
    # batch index in the high bits, one argsort over the flattened batch.
    b, g, _ = center.shape
    grid = torch.floor(center / grid_size).long()
    grid = grid - grid.min(dim=1, keepdim=True).values
    grid = grid.flatten(0, 1)
    if swap:
        grid = grid[:, [1, 0, 2]]
    depth = int(bit_length(grid.max()))
    batch = torch.arange(b).repeat_interleave(g)
    code = (batch << (3 * depth)) | hilbert_encode(grid, depth)
    return code.argsort() - (batch * g)  # flat order, back to per-cloud indices (clouds stay in blocks)


def _official_forward(model, pts):
    neighborhood, center, _ = group_points(pts, model.num_group, model.group_size)
    tokens, pos = model.encoder(neighborhood), model.pos_embed(center)
    b, g, c = tokens.shape
    xs, ps = [], []
    for i, swap in ((1, False), (2, True)):
        order = _official_order(center, swap).reshape(b, g)
        idx = order[..., None].expand(-1, -1, c)
        gamma, beta = getattr(model, f"OrderScale_gamma_{i}"), getattr(model, f"OrderScale_beta_{i}")
        xs.append(tokens.gather(1, idx) * gamma + beta)
        ps.append(pos.gather(1, idx))
    x = torch.cat(xs, 1) + torch.cat(ps, 1)
    for layer in model.blocks.layers:  # the official pre-norm block: x + mixer(norm(x))
        x = x + layer.mixer(layer.norm(x))
    x = model.blocks.norm_f(x)
    return model.cls_head_finetune(x.mean(1))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return PointMamba(**SMALL).eval()


def test_matches_restated_official_forward(model):
    pts = torch.rand(2, 96, 3) * 0.6  # depth 5 for both clouds, so batch-wide depth == per-cloud
    with torch.no_grad():
        torch.testing.assert_close(model(pts), _official_forward(model, pts), rtol=1e-4, atol=1e-5)


def test_official_checkpoint_layout_loads(model):
    # The released files: {"base_model": DDP-prefixed state dict, "optimizer": ..., "epoch": ...}.
    official = {"base_model": {"module." + k: v.clone() for k, v in model.state_dict().items()}, "epoch": 300}
    keys = set(official["base_model"])
    for name in ("module.blocks.layers.0.mixer.in_proj.weight", "module.blocks.layers.1.mixer.A_log",
                 "module.blocks.layers.0.norm.weight", "module.blocks.norm_f.bias",
                 "module.encoder.first_conv.0.weight", "module.encoder.second_conv.3.weight",
                 "module.pos_embed.2.weight", "module.cls_head_finetune.8.weight",
                 "module.OrderScale_gamma_1", "module.OrderScale_beta_2"):
        assert name in keys
    fresh = PointMamba(**SMALL).eval()
    fresh.load_state_dict(checkpoint_filter_fn(official, fresh), strict=True)
    pts = torch.rand(2, 80, 3)
    with torch.no_grad():
        torch.testing.assert_close(fresh(pts), model(pts))


MPM_SMALL = dict(trans_dim=32, depth=2, decoder_depth=1, num_group=10, group_size=8, mask_ratio=0.6)


def test_mpm_loss_reconstruction_and_official_layout():
    torch.manual_seed(4)
    mpm = PointMambaMPM(**MPM_SMALL)
    loss, rebuilt = mpm(torch.rand(2, 64, 3), return_reconstruction=True)
    assert rebuilt.shape == (2, 6, 8, 3)  # int(0.6 * 10) hidden patches of 8 points per cloud
    loss.backward()
    assert mpm.mask_token.grad is not None and mpm.MAE_encoder.blocks.layers[0].mixer.A_log.grad is not None
    official = {"base_model": {"module." + k: v for k, v in mpm.state_dict().items()}}
    for name in ("module.MAE_encoder.blocks.layers.1.mixer.x_proj.weight", "module.MAE_encoder.OrderScale_gamma_2",
                 "module.MAE_decoder.blocks.layers.0.norm.weight", "module.MAE_decoder.blocks.norm_f.weight",
                 "module.mask_token", "module.decoder_pos_embed.2.bias", "module.increase_dim.0.weight"):
        assert name in official["base_model"], name
    PointMambaMPM(**MPM_SMALL).load_state_dict(mpm_checkpoint_filter_fn(official, mpm), strict=True)
    # The same file initialises a classifier: encoder weights kept, decoder dropped, fresh head.
    target = PointMamba(**{**SMALL, "num_classes": 3, "num_group": 10})
    target.load_state_dict(checkpoint_filter_fn(official, target), strict=True)
    torch.testing.assert_close(target.blocks.layers[1].mixer.in_proj.weight, mpm.MAE_encoder.blocks.layers[1].mixer.in_proj.weight)


def test_chamfer_l2_matches_loops():
    a, b = torch.rand(3, 5, 3), torch.rand(3, 7, 3)
    fwd = sum(min(float(((a[i, p] - b[i, q]) ** 2).sum()) for q in range(7)) for i in range(3) for p in range(5)) / 15
    bwd = sum(min(float(((a[i, p] - b[i, q]) ** 2).sum()) for p in range(5)) for i in range(3) for q in range(7)) / 21
    torch.testing.assert_close(chamfer_l2(a, b), torch.tensor(fwd + bwd), rtol=1e-5, atol=1e-6)


def test_variable_lengths_match_single_clouds(model):
    torch.manual_seed(1)
    pts = torch.rand(2, 70, 3)
    lengths = torch.tensor([70, 40])
    with torch.no_grad():
        batched = model(pts, lengths)
        alone = model(pts[1:, :40])
    torch.testing.assert_close(batched[1:], alone, rtol=1e-4, atol=1e-5)


def test_interface_and_backward(model):
    m = PointMamba(**SMALL)
    out = m(torch.rand(3, 64, 3))
    out.sum().backward()
    assert m.blocks.layers[0].mixer.A_log.grad is not None
    assert "OrderScale_gamma_1" in m.no_weight_decay()
    feats = m.forward_features(torch.rand(2, 64, 3))
    assert feats.shape == (2, 16, 32) and m.forward_head(feats, pre_logits=True).shape == (2, 32)
    m.reset_classifier(0)
    assert m(torch.rand(2, 64, 3)).shape == (2, 32)
    m.reset_classifier(7, global_pool="avg_max")
    assert m.eval()(torch.rand(2, 64, 3)).shape == (2, 7)


def test_bad_input_errors(model):
    with pytest.raises(ValueError, match=r"\(num_group=8, group_size=8\): expected at least 8 point\(s\) per cloud, got 5 in cloud 0"):
        model(torch.rand(1, 5, 3))
    with pytest.raises(ValueError, match=r"expected at least 8 point\(s\) per cloud, got 0 in cloud 1"):
        model(torch.rand(2, 20, 3), lengths=torch.tensor([20, 0]))
    bad = torch.rand(1, 20, 3)
    bad[0, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="expected finite coordinates"):
        model(bad)
    with pytest.raises(ValueError, match=r"expected points of shape \(batch, num_points, 3\), got \(1, 20, 6\)"):
        model(torch.rand(1, 20, 6))


def test_registered_entries_param_counts():
    from zoo.models.point.pointmamba import pointmamba_modelnet40, pointmamba_scanobjectnn

    # Published: 12.3M parameters (Tables 1-2 of the NeurIPS paper).
    for fn, classes in ((pointmamba_modelnet40, 40), (pointmamba_scanobjectnn, 15)):
        with torch.device("meta"):
            m = fn()
        assert m.num_classes == classes
        assert round(sum(p.numel() for p in m.parameters()) / 1e6, 1) == 12.3
    import zoo

    assert {"pointmamba_modelnet40", "pointmamba_scanobjectnn", "pointmamba_mpm", "pointmamba_partseg"} <= set(zoo.list_models("pointmamba*"))
    assert {"pointmamba_scanobjectnn.hardest", "pointmamba_mpm.shapenet55"} <= set(zoo.list_models("pointmamba*", pretrained=True))
    info = zoo.model_info("pointmamba_scanobjectnn.hardest")
    assert info["pretrained_cfgs"]["pointmamba_scanobjectnn.hardest"]["metrics"] == {"scanobjectnn_pb_t50_rs_oa": 89.31}
    assert round(info["num_params"] / 1e6, 1) == 12.3


def test_part_segmentation_head():
    torch.manual_seed(5)
    m = PointMambaPartSeg(num_parts=6, num_object_classes=3, trans_dim=16, depth=4, num_group=8, group_size=8,
                          fetch_idx=(1, 3), head_hidden=8)
    pts = torch.rand(2, 48, 3)
    logits = m(pts, torch.tensor([0, 2]))
    assert logits.shape == (2, 48, 6)
    logits.sum().backward()
    assert m.blocks.layers[1].mixer.in_proj.weight.grad is not None and m.label_conv[0].weight.grad is not None
    assert "propagation_0.mlp_convs.1.weight" in m.state_dict() and "convs3.weight" in m.state_dict()
    with pytest.raises(ValueError, match=r"object labels must lie in \[0, 3\), got min 0, max 3"):
        m(pts, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"block indices must lie in \[0, 4\), got \[7\]"):
        m.blocks.forward_intermediates(torch.zeros(1, 2, 16), torch.zeros(1, 2, 16), [7])


def test_feature_propagation_interpolates_inverse_distance():
    fp = FeaturePropagation(2, [])  # no MLP: the interpolation alone
    src = torch.tensor([[[0.0, 0, 0], [1, 0, 0], [0, 2, 0], [5, 5, 5]]])
    src_f = torch.tensor([[[1.0], [2.0], [3.0], [100.0]]])
    q = torch.tensor([[[0.5, 0.0, 0.0]]])
    out = fp(q, src, torch.zeros(1, 1, 1), src_f)
    d = torch.tensor([0.25, 0.25, 0.25 + 4.0])  # squared distances to the three nearest sources
    w = (1 / (d + 1e-8)) / (1 / (d + 1e-8)).sum()
    torch.testing.assert_close(out[0, :, 0], torch.stack([torch.tensor(0.0), (w * torch.tensor([1.0, 2.0, 3.0])).sum()]))


def test_bfloat16_forward_keeps_the_official_residual_dtype(model):
    # The official block is x + mixer(norm(x)) in the input dtype (residual_in_fp32 False): in bfloat16 the
    # residual stream is rounded to bfloat16 after every block, exactly as the restated official forward does.
    low = PointMamba(**SMALL).eval()
    low.load_state_dict(model.state_dict())
    low.to(torch.bfloat16)
    pts = (torch.rand(2, 96, 3) * 0.6).to(torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(low(pts), _official_forward(low, pts), rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the half-precision kernels")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_on_cuda_matches_float64(model, dtype):
    pts = torch.rand(2, 96, 3) * 0.6
    low = PointMamba(**SMALL).eval()
    low.load_state_dict(model.state_dict())
    with torch.no_grad():
        ref = low.double()(pts.double())
        out = low.to("cuda", dtype)(pts.to("cuda", dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.double().cpu(), ref, rtol=0.05, atol=0.05)
