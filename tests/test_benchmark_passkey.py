"""benchmarks/passkey.py: the task generator and the training-length curriculum."""
import importlib.util
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "passkey.py"
_spec = importlib.util.spec_from_file_location("bench_passkey", _PATH)
passkey = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(passkey)


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
