"""Point Cloud Mamba: grouping restated per point, official checkpoint layout, entries, bad input."""
import pytest
import torch

from zoo.models.point.pcm import LocalGrouper, PointCloudMamba, checkpoint_filter_fn

SMALL = dict(num_classes=4, embed_dim=16, dim_expansion=(1, 2), pre_blocks=(1, 1), mamba_blocks=(1, 2),
             k_neighbors=(4, 4), reducers=(1, 2), orders=("xyz", "hilbert", "zyx"), prompt_num_per_order=2,
             prompt_dim=8)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return PointCloudMamba(**SMALL).eval()


def test_local_grouper_matches_per_point_restatement():
    torch.manual_seed(1)
    g = LocalGrouper(channels=5, reducer=1, k=4)
    with torch.no_grad():
        g.affine_alpha.normal_()
        g.affine_beta.normal_()
    xyz, feats = torch.rand(2, 20, 3), torch.randn(2, 20, 5)
    _, out, _ = g(xyz, feats, None)
    for b in range(2):
        diffs = []
        for j in range(20):
            nbr = torch.cdist(xyz[b, j : j + 1], xyz[b])[0].topk(4, largest=False).indices
            rows = torch.cat([feats[b, nbr], xyz[b, nbr]], -1)
            diffs.append(rows - torch.cat([feats[b, j], xyz[b, j]]))
        diffs = torch.stack(diffs)
        expected = g.affine_alpha[0, 0] * diffs / (diffs.std() + 1e-5) + g.affine_beta[0, 0]
        expected = torch.cat([expected, feats[b, :, None].expand(-1, 4, -1)], -1)
        torch.testing.assert_close(out[b], expected, rtol=1e-5, atol=1e-5)


def test_output_does_not_depend_on_input_point_order(model):
    # Serialization sorts the points before every layer, and FPS then starts from the sorted
    # sequence, so shuffling the input (no two points in one grid cell) leaves the logits unchanged.
    torch.manual_seed(2)
    pts = torch.rand(2, 64, 3)
    with torch.no_grad():
        torch.testing.assert_close(model(pts), model(pts[:, torch.randperm(64)]), rtol=1e-4, atol=1e-5)


def test_official_checkpoint_layout_loads(model):
    official = {"model": {"module." + k: v.clone() for k, v in model.state_dict().items()}, "epoch": 250}
    for name in ("encoder.embedding.net.0.weight", "encoder.local_grouper_list.1.affine_alpha",
                 "encoder.pre_blocks_list.0.transfer.net.1.running_mean", "encoder.pre_blocks_list.1.operation.0.net2.0.weight",
                 "encoder.mamba_blocks_list.1.1.mixer.A_b_log", "encoder.mamba_blocks_list.0.0.norm.weight",
                 "encoder.residual_proj_blocks_list.1.weight", "encoder.pos_proj.1.weight", "encoder.order_prompt.weight",
                 "encoder.order_prompt_proj.0.weight", "prediction.head.0.0.weight", "prediction.head.4.0.bias"):
        assert "module." + name in official["model"], name
    fresh = PointCloudMamba(**SMALL).eval()
    fresh.load_state_dict(checkpoint_filter_fn(official, fresh), strict=True)
    pts = torch.rand(2, 32, 3)
    with torch.no_grad():
        torch.testing.assert_close(fresh(pts), model(pts))
    other = PointCloudMamba(**{**SMALL, "num_classes": 9})
    other.load_state_dict(checkpoint_filter_fn(official, other), strict=True)  # new head kept


def test_official_cts_variant_runs_and_differs(model):
    official = PointCloudMamba(**{**SMALL, "cts_variant": "official"}).eval()
    official.load_state_dict(model.state_dict())
    pts = torch.rand(2, 32, 3)
    with torch.no_grad():
        assert not torch.allclose(official(pts), model(pts))


def test_backward_and_height_channel():
    m = PointCloudMamba(**{**SMALL, "in_channels": 4})
    assert m.encoder.embedding.net[0].in_channels == 4
    m(torch.rand(3, 32, 3)).sum().backward()
    assert m.encoder.order_prompt.weight.grad is not None
    assert m.encoder.mamba_blocks_list[1][1].mixer.A_b_log.grad is not None


def test_bad_input_errors(model):
    with pytest.raises(ValueError, match=r"k_neighbors=\[4, 4\]\): expected at least 4 point\(s\) per cloud, got 3 in cloud 0"):
        model(torch.rand(1, 3, 3))
    bad = torch.rand(1, 32, 3)
    bad[0, 7] = float("inf")
    with pytest.raises(ValueError, match="expected finite coordinates"):
        model(bad)
    with pytest.raises(ValueError, match=r"expected one order per Mamba layer \(3\), got 2"):
        PointCloudMamba(**{**SMALL, "orders": ("xyz", "z")})
    with pytest.raises(ValueError, match=r"unknown orders \['xxy'\]"):
        PointCloudMamba(**{**SMALL, "orders": ("xyz", "z", "xxy")})


def test_registered_entries():
    import zoo
    from zoo.models.point import pcm

    counts = {}
    for name in ("pcm_modelnet40", "pcm_tiny_scanobjectnn"):
        with torch.device("meta"):
            counts[name] = sum(p.numel() for p in getattr(pcm, name)().parameters())
    assert round(counts["pcm_modelnet40"] / 1e6, 1) == 34.2
    assert round(counts["pcm_tiny_scanobjectnn"] / 1e6, 1) == 6.9
    info = zoo.model_info("pcm_scanobjectnn.hardest")
    assert info["pretrained_cfgs"]["pcm_scanobjectnn.hardest"]["metrics"]["scanobjectnn_pb_t50_rs_oa"] == 88.0
