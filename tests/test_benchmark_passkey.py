"""benchmarks/passkey.py: the task generator and the training-length curriculum."""

import pytest
import torch
from benchmark_scripts import load_benchmark

passkey = load_benchmark("passkey")


def test_passkey_batch_places_marker_digit_and_query():
    tokens, labels = passkey.passkey_batch(64, 37, torch.Generator().manual_seed(3))
    assert tokens.shape == (64, 37) and labels.shape == (64,)
    assert (tokens[:, -1] == passkey.QUERY).all()
    for row, label in zip(tokens, labels):
        (where,) = (row == passkey.MARKER).nonzero(as_tuple=True)
        assert where.numel() == 1 and row[where + 1] == label  # the digit follows its marker
    with pytest.raises(ValueError, match="length must be >= 4"):
        passkey.passkey_batch(2, 3, torch.Generator())


def test_length_curriculum_rises_then_holds():
    cfg = dict(task=dict(train_length=1024, start_length=64), train=dict(steps=100, length_warmup=0.3))
    lengths = [passkey.train_length_at(s, cfg) for s in range(100)]
    assert lengths[0] == 64 and lengths[15] == 64 + (1024 - 64) * 15 // 30
    assert all(a <= b for a, b in zip(lengths, lengths[1:]))
    assert set(lengths[30:]) == {1024}
    plain = dict(task=dict(train_length=256), train=dict(steps=10))
    assert {passkey.train_length_at(s, plain) for s in range(10)} == {256}


def test_state_capacity_runs(tmp_path):
    import json

    import yaml

    cfg = dict(task=dict(train_length=16, eval_lengths=[16, 32], eval_samples=8),
               model=dict(d_model=8, depth=1, d_state=4, d_mem=4, pool_size=2, chunk=4, cross_layer_every=0),
               train=dict(steps=2, batch_size=4, lr=1e-3, weight_decay=0.0, seed=0), models=["mamba"], device="cpu")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert passkey.main(["--config", str(tmp_path / "c.yaml"), "--state-sizes", "2", "4", "--out", str(tmp_path / "o.json")]) == 0
    rows = json.loads((tmp_path / "o.json").read_text())["capacity"]
    assert [r["d_state"] for r in rows] == [2, 4] and [r["state_numbers"] for r in rows] == [16 * 2, 16 * 4]
    assert all(set(r["accuracy"]) == {"16", "32"} and "capacity" in r for r in rows)
