"""Vim features_only / out_indices: 2-D token maps without the middle class token, as timm's ViT."""
import pytest
import timm
import torch

import zoo
from zoo.core.block import add_norm

TINY = dict(embed_dim=24, depth=4, patch_size=8, stride=8, img_size=(24, 40))  # 3 x 5 grid


def test_intermediates_are_the_residual_stream_without_the_class_token():
    torch.manual_seed(0)
    model = zoo.create_model("vim_tiny", num_classes=0, **TINY).eval()
    x = torch.randn(2, 3, 24, 40)
    final, maps = model.forward_intermediates(x, indices=[1, 3], norm=True)
    assert torch.allclose(final, model.forward_features(x))
    # Restated: run the blocks by hand, sum the stream, norm it, drop token n // 2 = 7, lay out the 3 x 5 grid.
    hidden, residual = model._pos_embed(*model.patch_embed(x)), None
    expected = []
    for layer in model.layers:
        hidden, residual = layer(hidden, residual)
        tokens = model.norm_f(residual + hidden)
        tokens = torch.cat([tokens[:, :7], tokens[:, 8:]], 1)
        expected.append(tokens.reshape(2, 3, 5, 24).permute(0, 3, 1, 2))
    assert [tuple(m.shape) for m in maps] == [(2, 24, 3, 5)] * 2
    assert torch.allclose(maps[0], expected[1]) and torch.allclose(maps[1], expected[3])
    # The last block's normed map is forward_features' tokens without the class token.
    assert torch.allclose(maps[1].flatten(2).transpose(1, 2), torch.cat([final[:, :7], final[:, 8:]], 1), atol=1e-6)
    nlc = model.forward_intermediates(x, indices=1, output_fmt="NLC", intermediates_only=True)
    assert len(nlc) == 1 and nlc[0].shape == (2, 15, 24)


def test_features_only_like_timm_vit():
    model = zoo.create_model("vim_small", features_only=True, out_indices=(0, 2), **{**TINY, "depth": 5})
    assert len(model.model.layers) == 3  # pruned after the last block asked for
    assert model.feature_info.channels() == [24, 24] and model.feature_info.reduction() == [8, 8]
    maps = model(torch.randn(1, 3, 40, 56))  # another size: 5 x 7 grid
    assert [tuple(m.shape) for m in maps] == [(1, 24, 5, 7)] * 2
    maps[-1].mean().backward()
    assert model.model.patch_embed.proj.weight.grad is not None
    last2 = timm.create_model("vim_tiny", features_only=True, out_indices=2, **TINY)
    assert last2.feature_info.module_name() == ["layers.2", "layers.3"]


def test_bad_arguments():
    model = zoo.create_model("vim_tiny", **TINY)
    with pytest.raises(ValueError, match="output_fmt must be 'NCHW' or 'NLC', got 'NHWC'"):
        model.forward_intermediates(torch.randn(1, 3, 24, 40), output_fmt="NHWC")
    with pytest.raises(AssertionError, match="out of range"):
        zoo.create_model("vim_tiny", features_only=True, out_indices=(4,), **TINY)
