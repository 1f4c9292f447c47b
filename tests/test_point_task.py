"""Shapes3D generation and the point-classification benchmark loop (tiny sizes)."""
import argparse
import json

import numpy as np
import pytest
import torch

from zoo.data.shapes3d import CLASSES, make_shapes3d, sample_shape
from zoo.tasks.point_classification import PointNetBaseline, add_cli


def test_shapes3d_deterministic_normalised_balanced():
    x, y = make_shapes3d(4, 128, seed=3)
    x2, y2 = make_shapes3d(4, 128, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert x.shape == (20, 128, 3) and x.dtype == torch.float32
    assert y.bincount().tolist() == [4] * len(CLASSES)
    radius = x.norm(dim=-1).amax(1)
    torch.testing.assert_close(radius, torch.ones(20))
    torch.testing.assert_close(x.mean(1), torch.zeros(20, 3), atol=1e-5, rtol=0)
    assert not torch.equal(make_shapes3d(4, 128, seed=4)[0], x)


def test_sphere_points_lie_on_an_ellipsoid_surface_not_inside():
    rng = np.random.default_rng(0)
    p = sample_shape(rng, 0, 2000, noise=0.0, occlusion_prob=0.0)
    # A scaled, rotated unit sphere: a quadric x^T M x = 1 fitted by least squares has ~zero residual.
    feats = np.stack([p[:, 0] ** 2, p[:, 1] ** 2, p[:, 2] ** 2, p[:, 0] * p[:, 1], p[:, 0] * p[:, 2], p[:, 1] * p[:, 2],
                      p[:, 0], p[:, 1], p[:, 2]], 1)
    coef, *_ = np.linalg.lstsq(feats, np.ones(len(p)), rcond=None)
    assert np.abs(feats @ coef - 1).max() < 1e-6
    with pytest.raises(ValueError, match=r"label must be in \[0, 5\), got 7"):
        sample_shape(rng, 7, 10)


def test_bench_cli_runs_and_writes_json(tmp_path):
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command"))
    out = tmp_path / "points.json"
    args = parser.parse_args(["points", "bench", "--epochs", "1", "--train-per-class", "3", "--test-per-class", "2",
                              "--num-points", "128", "--batch-size", "8", "--output", str(out)])
    args.command_line = "zoo points bench (test)"
    assert args.func(args) == 0
    table = json.loads(out.read_text())
    assert [r["model"] for r in table["results"]] == ["pointmamba", "pcm", "pointnet"]
    assert table["command"] == "zoo points bench (test)"
    assert 0.0 <= table["results"][0]["overall_accuracy_mean"] <= 1.0


def test_pointnet_baseline_shape_error():
    with pytest.raises(ValueError, match=r"expected points of shape \(batch, num_points, 3\), got \(2, 3, 64\)"):
        PointNetBaseline(5)(torch.rand(2, 3, 64))
