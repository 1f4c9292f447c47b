"""Quamba2-style real low-bit inference: integer and int4 matmuls against a float64 reference of the same quantised
arithmetic, the sort-and-cluster permutation's invariance, storage, conversion of zoo models, errors."""
import copy

import pytest
import torch
from torch import nn
from benchmark_scripts import load_benchmark

from zoo.core import Mamba
from zoo.core.mamba import BiMamba
from zoo.core.mamba2 import BiMamba2, Mamba2
from zoo.research.mambaquant import hadamard
from zoo.research.quamba2 import (
    QuantizedEmbedding, QuantizedLinear, contiguous_clusters, hadamard_transform, int8_matmul, model_bytes,
    pack_int4, permute_mixer, quantize_model, reference_linear, sort_and_cluster, unpack_int4,
)


class Toy(nn.Module):
    def __init__(self, mixer):
        super().__init__()
        self.embed = nn.Linear(5, 32)
        self.mixer = mixer
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head(self.mixer(self.embed(x)))


MIXERS = {
    "mamba": lambda: Mamba(32, d_state=4, expand=2),
    "bimamba": lambda: BiMamba(32, d_state=4, expand=2),
    "mamba2": lambda: Mamba2(32, d_state=8, headdim=8, ngroups=2, chunk_size=8),
    "bimamba2": lambda: BiMamba2(32, d_state=8, headdim=8, ngroups=2, chunk_size=8),
}


def _with_outliers(model):
    """Give the scan input a few large channels, as trained models have (else clusters are trivial)."""
    with torch.no_grad():
        model.mixer.in_proj.weight[:6] *= 8.0
    return model


def test_int4_packing_and_hadamard_transform():
    q = torch.randint(-8, 8, (5, 12))
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 6)
    assert torch.equal(unpack_int4(packed), q.to(torch.int8))
    for n in (1, 8, 24, 48, 64):
        x = torch.randn(3, n, dtype=torch.float64)
        torch.testing.assert_close(hadamard_transform(x), x @ hadamard(n))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.tensor([[8, 0]]))
    with pytest.raises(ValueError, match="even number"):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8))


@pytest.mark.parametrize("m", [1, 7, 17, 40])
def test_int8_matmul_is_exact(m):
    a = torch.randint(-127, 128, (m, 64), dtype=torch.int8)
    b = torch.randint(-127, 128, (64, 24), dtype=torch.int8)
    assert torch.equal(int8_matmul(a, b), a.int() @ b.int())
    with pytest.raises(ValueError, match="int8"):
        int8_matmul(a.float(), b)


@pytest.mark.parametrize("w_bits,a_bits,hadamard_on,in_scale", [
    (8, 8, False, False), (8, 8, True, False), (4, 8, True, False), (8, 8, False, True), (4, 8, False, True),
    (4, None, False, False), (4, None, True, False), (8, None, False, False),
])
def test_integer_path_equals_float64_reference(w_bits, a_bits, hadamard_on, in_scale):
    torch.manual_seed(0)
    lin = nn.Linear(40, 21)  # neither width aligned: padded inside
    x = torch.randn(2, 9, 40) * 3
    scale = x.abs().amax((0, 1)) / 127 if in_scale else None  # per-channel scales, as clusters give
    a_scale = 1.0 if in_scale else float(x.abs().max()) / 127 if a_bits else None
    group = 32 if a_bits is None and w_bits == 4 else None
    q = QuantizedLinear(lin, w_bits, a_bits, a_scale, scale, hadamard=hadamard_on, group_size=group)
    assert q.qweight.dtype == (torch.uint8 if w_bits == 4 else torch.int8)
    out = q(x)
    ref = reference_linear(q, x)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    # The quantised layer stays close to the float one, and its weight reads back in the original basis.
    assert (out - lin(x)).abs().max() < 0.15 * lin(x).abs().max()
    rel = (q.weight - lin.weight).norm() / lin.weight.norm()
    assert rel < (0.15 if w_bits == 4 else 0.01), float(rel)


def test_w4a16_triton_kernel_in_interpreter():
    pytest.importorskip("triton")
    from zoo.kernels.quant import w4a16_matmul_triton

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lin = nn.Linear(96, 40)
    q = QuantizedLinear(lin, 4, None, group_size=32)
    x = torch.randn(19, 96)
    out = w4a16_matmul_triton(x.to(device), q.qweight.to(device), q.w_scale.to(device), q.group_size)
    torch.testing.assert_close(out.cpu().double(), x.double() @ q.dequantized().double().T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="multiples of"):
        w4a16_matmul_triton(x[:, :90].to(device), q.qweight.to(device), q.w_scale.to(device), q.group_size)


def test_contiguous_clusters_is_the_optimal_cut():
    pts = torch.tensor([0.0, 0.1, 0.2, 5.0, 5.1, 9.0, 9.2, 30.0])
    assert contiguous_clusters(pts, 4).tolist() == [3, 2, 2, 1]
    assert contiguous_clusters(pts, 20).tolist() == [1] * 8


def test_sort_and_cluster_keeps_heads_in_groups():
    torch.manual_seed(0)
    stat = torch.rand(2 * 4 * 8)
    perm, clusters = sort_and_cluster(stat, headdim=8, ngroups=2, n_head_groups=2, n_channel_groups=3)
    assert sorted(perm.tolist()) == list(range(64))
    heads = perm.reshape(8, 8) // 8
    assert torch.all(heads == heads[:, :1]) and torch.all(heads[:, 0] // 4 == torch.arange(8) // 4)
    assert torch.all(stat[perm].reshape(8, 8).diff(dim=1) >= 0)  # sorted within each head
    assert int(clusters.max()) + 1 <= 2 * 2 * 3
    with pytest.raises(ValueError, match="not ngroups"):
        sort_and_cluster(torch.rand(30), headdim=8, ngroups=1)


@pytest.mark.parametrize("kind", list(MIXERS))
def test_permutation_leaves_the_float_model_unchanged(kind):
    torch.manual_seed(0)
    model = Toy(MIXERS[kind]()).eval()
    x = torch.randn(2, 12, 5)
    ref = model(x)
    channels = model.mixer.d_inner if isinstance(model.mixer, Mamba) else model.mixer.d_ssm
    headdim = channels if isinstance(model.mixer, Mamba) else model.mixer.headdim
    ngroups = 1 if isinstance(model.mixer, Mamba) else model.mixer.ngroups
    perm, _ = sort_and_cluster(torch.rand(channels), headdim, ngroups)
    assert not torch.equal(perm, torch.arange(channels))
    permute_mixer(model.mixer, perm)
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_permutation_errors():
    with pytest.raises(ValueError, match="permutation of the 64"):
        permute_mixer(Mamba(32, d_state=4), torch.arange(63))
    m2 = Mamba2(32, d_state=8, headdim=8, ngroups=2)
    with pytest.raises(ValueError, match="head's channels together"):
        permute_mixer(m2, torch.cat([torch.tensor([1, 0]), torch.arange(2, 64)]).roll(4))
    with pytest.raises(ValueError, match="SSD group"):
        permute_mixer(m2, torch.arange(64).roll(8))  # moves a head into the other group
    with pytest.raises(TypeError, match="Mamba or Mamba2"):
        permute_mixer(nn.Linear(2, 2), torch.arange(2))


@pytest.mark.parametrize("kind", list(MIXERS))
@pytest.mark.parametrize("scheme", ["W8A8", "W4A8", "W4A16"])
def test_quantize_model_stores_low_bit_weights_and_stays_close(kind, scheme):
    torch.manual_seed(0)
    model = _with_outliers(Toy(MIXERS[kind]())).eval()
    x = torch.randn(3, 12, 5)
    ref = model(x)
    calib = [(torch.randn(4, 12, 5),) for _ in range(2)]
    before = model_bytes(model)
    q = quantize_model(copy.deepcopy(model), calib, scheme=scheme)
    linears = [m for m in q.modules() if isinstance(m, QuantizedLinear)]
    assert len(linears) == len([m for m in model.modules() if isinstance(m, nn.Linear)])
    assert not any(isinstance(m, nn.Linear) for m in q.modules())
    assert all(m.qweight.dtype in (torch.int8, torch.uint8) for m in linears)
    assert model_bytes(q) < before
    err = (q(x) - ref).abs().max() / ref.abs().max()
    assert err < (0.1 if scheme == "W8A8" else 0.3), float(err)
    if scheme != "W4A16":
        mixer = q.mixer
        assert mixer.quamba2.mode == "quantize" and torch.all(mixer.quamba2.x_scale > 0)
        assert mixer.quamba2.B_scale.shape == (1 if isinstance(mixer, Mamba) else 2,)
        assert q.mixer.in_proj.hadamard and q.mixer.out_proj.hadamard and not q.head.hadamard
        assert q.mixer.dt_proj.a_bits is None if isinstance(mixer, Mamba) else True  # dt_proj: weight-only
        # The number of distinct x scales is the number of clusters: at most 4 x 4 per SSD group.
        assert 1 < len(set(mixer.quamba2.x_scale.tolist())) <= 16 * mixer.quamba2.ngroups


def test_sort_and_cluster_beats_one_scale_for_x():
    """The rounding error of the scan input x: clusters with their own scales vs one scale for all of x (on a
    calibration batch: fresh inputs beyond the calibrated range are clipped either way)."""
    torch.manual_seed(0)
    model = Toy(MIXERS["mamba2"]()).eval()
    with torch.no_grad():  # two heads (x rows 64:80 of in_proj) with much larger x than the others
        model.mixer.in_proj.weight[64:80] *= 20.0
    calib = [(torch.randn(4, 12, 5),) for _ in range(2)]
    errs = {}
    for sc in (True, False):
        q = quantize_model(copy.deepcopy(model), calib, scheme="W8A8", sort_cluster=sc)
        quant, seen = q.mixer.quamba2.quantize, []

        def record(x, *args):
            out = quant(x, *args)
            seen.append(float(((out[0] - x) ** 2).mean() / (x ** 2).mean()))
            return out

        q.mixer.quamba2.quantize = record
        with torch.no_grad():
            q(*calib[0])
        errs[sc] = seen[0]
    assert errs[True] < 0.2 * errs[False], errs


def test_lm_tied_embedding_shares_the_quantized_table():
    import zoo

    torch.manual_seed(0)
    model = zoo.create_model("mamba_tiny_lm", n_layer=2, d_model=64).eval()
    ids = torch.randint(0, 256, (2, 24))
    ref = model(ids)
    for scheme in ("W8A8", "W4A16"):
        q = quantize_model(copy.deepcopy(model), [torch.randint(0, 256, (2, 24)) for _ in range(2)], scheme=scheme)
        emb = q.backbone.embedding
        assert isinstance(emb, QuantizedEmbedding) and emb._tied is q.lm_head
        torch.testing.assert_close(emb(ids), q.lm_head.dequantized()[ids].to(emb(ids).dtype))
        assert model_bytes(q) < model_bytes(model) * (0.4 if scheme == "W8A8" else 0.3)  # float32 -> int8 / int4
        cos = torch.nn.functional.cosine_similarity(q(ids).flatten(), ref.flatten(), dim=0)
        assert cos > (0.99 if scheme == "W8A8" else 0.9), (scheme, float(cos))


def test_bad_configurations_raise_clear_errors():
    model = Toy(MIXERS["mamba"]())
    calib = [(torch.randn(2, 8, 5),)]
    with pytest.raises(ValueError, match="scheme must be one of"):
        quantize_model(copy.deepcopy(model), calib, scheme="W2A8")
    with pytest.raises(ValueError, match="needs calibration batches"):
        quantize_model(copy.deepcopy(model), None, scheme="W8A8")
    with pytest.raises(ValueError, match="n_head_groups must be a positive integer"):
        quantize_model(copy.deepcopy(model), calib, n_head_groups=0)
    q = quantize_model(copy.deepcopy(model), None, scheme="W4A16")  # no activations to calibrate
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(q, calib)
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantize_model(nn.Sequential(nn.ReLU()), calib)
    with pytest.raises(ValueError, match="w_bits must be 4 or 8"):
        QuantizedLinear(nn.Linear(4, 4), 2, 8, 1.0)
    with pytest.raises(ValueError, match="float activations"):
        QuantizedLinear(nn.Linear(4, 4), 4, 8, 1.0, group_size=32)
    with pytest.raises(ValueError, match="a_scale"):
        QuantizedLinear(nn.Linear(4, 4), 8, 8)
    with pytest.raises(ValueError, match=r"expected input \(\.\.\., 4\)"):
        QuantizedLinear(nn.Linear(4, 4), 8, None)(torch.randn(2, 5))


def test_benchmark_runs_on_a_shipped_tag(tmp_path, monkeypatch):
    """benchmarks/quamba2.py on the smallest shipped tag: every setting measured, fp32 row = the recorded metric,
    the converted models are smaller, the JSON records the command."""
    import json
    from pathlib import Path

    bench_dir = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(bench_dir))
    bench = load_benchmark("quamba2")
    out = tmp_path / "q2.json"
    assert bench.main(["--entries", "smamba_classifier.basicmotions", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = [r for r in result["results"] if "setting" in r]
    assert [r["setting"] for r in rows] == [m if s is None else f"{m} {s}" for m, s in bench.SETTINGS]
    recorded = json.loads((bench_dir / "results" / "pretrained_smamba_classifier.basicmotions.json").read_text())
    assert rows[0]["accuracy"] == recorded["accuracy"]
    sizes = {r["setting"]: r["model_bytes"] for r in rows}
    assert sizes["Quamba2 W4A16"] < sizes["Quamba2 W8A8"] < sizes["fp32"] / 2
    assert "smamba_classifier.basicmotions" in result["command"]


def test_benchmark_drop_follows_each_metric_direction():
    """Accuracy falling, an error rate or bits per byte rising: worse (positive), in points or bits per byte."""
    bench = load_benchmark("quamba2")
    assert bench.worse_by("accuracy", 0.90, 0.85) == pytest.approx(5.0)
    assert bench.worse_by("cer", 0.04, 0.05) == pytest.approx(1.0)
    assert bench.worse_by("cer", 0.05, 0.04) == pytest.approx(-1.0)
    assert bench.worse_by("bits_per_byte", 1.48, 1.51) == pytest.approx(0.03)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA paths: torch._int_mm's shape rules, the W4A16 kernel in bf16")
@pytest.mark.parametrize("rows", [1, 9, 17, 40])
@pytest.mark.parametrize("w_bits,a_bits", [(8, 8), (4, 8), (4, None)])
def test_cuda_paths_equal_the_reference(rows, w_bits, a_bits):
    torch.manual_seed(0)
    lin = nn.Linear(200, 72)
    x = torch.randn(rows, 200)
    a_scale = float(x.abs().max()) / 127 if a_bits else None
    q = QuantizedLinear(lin, w_bits, a_bits, a_scale, hadamard=True, group_size=None if a_bits else 128).cuda()
    out = q(x.cuda().to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 72)
    ref = reference_linear(q.cpu(), x)  # same buffers, on the CPU in float64
    torch.testing.assert_close(out.double().cpu(), ref, rtol=2e-2, atol=2e-2)  # bf16 input and output rounding
