"""MambaQuant-style W8A8 fake quantization: transforms, round trip, rotation invariance."""
import copy

import pytest
import torch
from torch import nn
from benchmark_scripts import load_benchmark

from zoo.core import Mamba
from zoo.research.mambaquant import QuantLinear, hadamard, klt_hadamard, quantize_model, quantize_symmetric


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(5, 24)
        self.mixer = Mamba(24, d_state=4, expand=2)
        self.head = nn.Linear(24, 3)

    def forward(self, x):
        return self.head(self.mixer(self.embed(x)))


@pytest.mark.parametrize("n", [1, 8, 24, 48])
def test_hadamard_is_orthogonal_with_equal_magnitudes_per_block(n):
    h = hadamard(n)
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64))
    b = n & -n
    assert torch.allclose(h[:b, :b].abs(), torch.full((b, b), b**-0.5, dtype=torch.float64))


def test_klt_rotation_aligns_channel_variances():
    torch.manual_seed(0)
    scales = torch.tensor([50.0, 1, 1, 1, 1, 1, 1, 0.1], dtype=torch.float64)
    # Outlier variance along a Hadamard direction: the Hadamard rotation puts it back in one channel.
    x = (torch.randn(4000, 8, dtype=torch.float64) * scales) @ hadamard(8).T
    cov = torch.cov(x.T)
    var_klt = torch.diag(klt_hadamard(cov).T @ cov @ klt_hadamard(cov))
    var_had = torch.diag(hadamard(8).T @ cov @ hadamard(8))
    torch.testing.assert_close(var_klt, torch.full_like(var_klt, float(torch.trace(cov)) / 8), rtol=1e-6, atol=1e-6)
    assert float(var_had.max() / var_had.min()) > 100  # Hadamard alone leaves them unequal here


def test_quantizer_round_trip():
    x = torch.linspace(-1, 1, 255)
    scale = torch.tensor(1 / 127)
    torch.testing.assert_close(quantize_symmetric(x, scale, 8), torch.round(x * 127) / 127)
    assert quantize_symmetric(torch.tensor([5.0]), scale, 8).item() == pytest.approx(1.0)  # clamped
    lin = nn.Linear(16, 4)
    q = QuantLinear(lin, w_bits=8, a_bits=None)
    err = (q.weight - lin.weight).abs().max(dim=1).values
    assert torch.all(err <= lin.weight.abs().amax(1) / 127 / 2 + 1e-7)


@pytest.mark.parametrize("method", ["per_channel", "hadamard", "mambaquant"])
def test_transformed_model_equals_original_in_float(method):
    torch.manual_seed(0)
    model = Toy()
    x = torch.randn(3, 10, 5)
    ref = model(x)
    calib = [(torch.randn(4, 10, 5),) for _ in range(2)]
    fq = quantize_model(copy.deepcopy(model), calib, method=method, w_bits=None, a_bits=None)
    assert sum(isinstance(m, QuantLinear) for m in fq.modules()) == 6  # embed, in/x/dt/out_proj, head
    torch.testing.assert_close(fq(x), ref, atol=1e-4, rtol=1e-4)


def test_w8a8_error_is_small_and_mambaquant_calibrates():
    torch.manual_seed(0)
    model = Toy()
    x = torch.randn(3, 10, 5)
    ref = model(x)
    calib = [(torch.randn(4, 10, 5),) for _ in range(2)]
    for method in ("per_channel", "mambaquant"):
        q = quantize_model(copy.deepcopy(model), calib, method=method)
        calibrated = {n: float(m.act_absmax) for n, m in q.named_modules() if isinstance(m, QuantLinear) and m.a_bits}
        assert sorted(calibrated) == ["embed", "head", "mixer.in_proj", "mixer.out_proj", "mixer.x_proj"]
        assert min(calibrated.values()) > 0 and q.mixer.dt_proj.a_bits is None  # dt_proj: weight-only
        assert (q(x) - ref).abs().max() < 0.05 * ref.abs().max()
    with pytest.raises(ValueError, match="method must be one of"):
        quantize_model(model, calib, method="gptq")


def test_benchmark_quantizes_a_shipped_tag(tmp_path, monkeypatch):
    """benchmarks/mambaquant.py on a shipped tag (as published, no training): the float row is the tag's
    recorded test metric, every setting is measured, the JSON records the command."""
    import json
    from pathlib import Path

    bench_dir = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(bench_dir))  # the script imports its sibling token_dynamics
    bench = load_benchmark("mambaquant")
    out = tmp_path / "mq.json"
    assert bench.main(["--entries", "smamba_classifier.basicmotions", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = [r for r in result["results"] if "setting" in r]
    assert [r["setting"] for r in rows][0] == "float" and len(rows) == len(bench.SETTINGS)
    recorded = json.loads((bench_dir / "results" / "pretrained_smamba_classifier.basicmotions.json").read_text())
    assert rows[0]["accuracy"] == recorded["accuracy"]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    assert "smamba_classifier.basicmotions" in result["command"]
