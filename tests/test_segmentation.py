"""Segmentation: Shapes2D data, mIoU against a brute-force count, UperNet on hierarchical and single-scale
backbones, the training loop and the `zoo segment` command at a tiny size."""
import json
import math

import pytest
import torch

from zoo.cli import main
from zoo.data.shapes2d import Shapes2D, make_shapes2d
from zoo.models.vision.upernet import SegmentationModel, SimplePyramid, UperNetHead
from zoo.tasks.segmentation import SegmentConfig, confusion_matrix, iou_from_confusion, train

VMAMBA = dict(dims=8, depths=(1, 1, 1, 1))
VIM = dict(embed_dim=16, depth=4, patch_size=8, stride=8, img_size=32)


def test_shapes2d_is_deterministic_and_masks_match_the_pixels():
    images, masks = make_shapes2d(6, size=32, seed=3)
    again, masks2 = make_shapes2d(6, size=32, seed=3)
    assert torch.equal(images, again) and torch.equal(masks, masks2)
    assert images.shape == (6, 3, 32, 32) and masks.dtype == torch.long
    assert set(masks.unique().tolist()) <= {0, 1, 2, 3} and (masks > 0).any()
    assert not torch.equal(make_shapes2d(6, size=32, seed=4)[1], masks)
    # Without noise each painted region is one flat colour: every shape pixel equals some other in its image.
    clean, m = make_shapes2d(4, size=32, noise=0.0, seed=1)
    for img, mask in zip(clean, m):
        for c in mask.unique().tolist():
            if c:
                colours = img[:, mask == c].T.unique(dim=0)
                assert len(colours) <= 4  # at most max_shapes flat colours per class
    ds = Shapes2D(3, size=16)
    x, y = ds[0]
    assert len(ds) == 3 and x.shape == (3, 16, 16) and y.shape == (16, 16)
    with pytest.raises(ValueError, match="expected num >= 1, size >= 8"):
        make_shapes2d(0)


def test_miou_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 5, (3, 9, 7), generator=g)
    target = torch.randint(0, 4, (3, 9, 7), generator=g)  # class 4 never in the targets
    target[0, :2] = 255  # ignored pixels
    conf = confusion_matrix(pred, target, 6)
    keep = target != 255
    brute = torch.zeros(6, 6, dtype=torch.long)
    for t, p in zip(target[keep].tolist(), pred[keep].tolist()):
        brute[t, p] += 1
    assert torch.equal(conf, brute)
    scores = iou_from_confusion(conf)
    ious = []
    for c in range(6):
        tp = sum(1 for t, p in zip(target[keep].tolist(), pred[keep].tolist()) if t == c and p == c)
        fp = sum(1 for t, p in zip(target[keep].tolist(), pred[keep].tolist()) if t != c and p == c)
        fn = sum(1 for t, p in zip(target[keep].tolist(), pred[keep].tolist()) if t == c and p != c)
        ious.append(tp / (tp + fp + fn) if tp + fp + fn else None)
    assert ious[5] is None and ious[4] == 0.0  # class 5 absent everywhere; 4 only predicted
    assert scores["iou"] == pytest.approx(ious)
    assert scores["miou"] == pytest.approx(sum(v for v in ious if v is not None) / 5)
    assert scores["pixel_accuracy"] == pytest.approx((pred[keep] == target[keep]).float().mean().item())
    assert iou_from_confusion(confusion_matrix(target, target, 6))["miou"] == 1.0
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\)"):
        confusion_matrix(pred, target, 4)
    with pytest.raises(ValueError, match="shapes differ"):
        confusion_matrix(pred[0], target, 6)


@pytest.mark.parametrize("backbone, kwargs, size", [("vmamba_tiny", VMAMBA, 40), ("vim_tiny", VIM, 48)])
def test_segmentation_model_forward_backward(backbone, kwargs, size):
    torch.manual_seed(0)
    model = SegmentationModel(backbone, 5, channels=16, **kwargs)
    if backbone == "vim_tiny":
        assert isinstance(model.neck, SimplePyramid)
        assert model.backbone.feature_info.module_name() == ["layers.0", "layers.1", "layers.2", "layers.3"]
    x = torch.randn(2, 3, size, size, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 5, size, size)
    out.logsumexp(1).mean().backward()
    assert x.grad is not None and all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_upernet_head_shapes_and_errors():
    head = UperNetHead([4, 8, 16], num_classes=3, channels=8).eval()
    feats = [torch.randn(1, 4, 16, 16), torch.randn(1, 8, 8, 8), torch.randn(1, 16, 3, 3)]
    assert head(feats).shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match=r"expected maps with channels \[4, 8, 16\], got \[4, 8, 8\]"):
        head(feats[:2] + [torch.randn(1, 8, 3, 3)])
    with pytest.raises(ValueError, match="at least 2 feature maps"):
        UperNetHead([4], 3)
    strides = [m.shape[-1] for m in SimplePyramid(4)([torch.randn(1, 4, 5, 5)] * 4)]
    assert strides == [20, 10, 5, 3]


def test_train_improves_miou_and_cli_writes_json(tmp_path):
    cfg = SegmentConfig(backbone_kwargs=VMAMBA, channels=16, img_size=32, num_train=32, num_val=16, epochs=2,
                        batch_size=8, progress=False)
    result = train(cfg)
    assert len(result["history"]) == 2 and 0.0 <= result["miou"] <= 1.0
    assert result["history"][1]["train_loss"] < math.log(4)  # below the uniform guess
    out = tmp_path / "seg.json"
    assert main(["segment", "--backbone", "vim_tiny", "--backbone-kwargs", *[f"{k}={v}" for k, v in VIM.items()],
                 "--channels", "8", "--img-size", "32", "--num-train", "8", "--num-val", "4", "--epochs", "1",
                 "--batch-size", "8", "--no-progress", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["backbone"] == "vim_tiny" and saved["command"].startswith("zoo segment --backbone vim_tiny")
    assert set(saved["iou"]) == {"background", "circle", "rectangle", "triangle"}


class FakeRegistry:
    """mmengine's Registry as the integration uses it: register_module(name, module, force), build(cfg)."""

    def __init__(self):
        self.modules = {}

    def register_module(self, name, module, force=False):
        assert callable(module) and (force or name not in self.modules)
        self.modules[name] = module

    def build(self, cfg):
        cfg = dict(cfg)
        return self.modules[cfg.pop("type")](**cfg)


def test_mmseg_backbone_adapter_without_mmseg():
    from zoo.integrations.mmseg import ZooBackbone, register_mmseg_backbones

    registry = FakeRegistry()
    names = register_mmseg_backbones(registry)
    assert {"ZooBackbone", "zoo_vmamba_tiny", "zoo_vim_small", "zoo_efficient_vmamba_tiny"} <= set(names)
    backbone = registry.build(dict(type="zoo_vmamba_tiny", out_indices=(1, 2, 3), **VMAMBA))
    backbone.init_weights()
    feats = backbone(torch.randn(1, 3, 32, 32))
    assert isinstance(feats, tuple) and [tuple(f.shape) for f in feats] == [(1, 16, 4, 4), (1, 32, 2, 2), (1, 64, 1, 1)]
    assert backbone.out_channels == [16, 32, 64] and backbone.strides == [8, 16, 32]
    vim = registry.build(dict(type="ZooBackbone", model_name="vim_tiny", out_indices=(0, 1, 2, 3), simple_pyramid=True, **VIM))
    assert [f.shape[-1] for f in vim(torch.randn(1, 3, 32, 32))] == [16, 8, 4, 2] and vim.strides == [2, 4, 8, 16]
    with pytest.raises(ValueError, match="init_cfg is not supported"):
        ZooBackbone("vim_tiny", init_cfg=dict(type="Pretrained"), **VIM)
    with pytest.raises(ValueError, match="simple_pyramid needs 4 maps of one width and stride"):
        ZooBackbone("vmamba_tiny", simple_pyramid=True, **VMAMBA)
