"""MIL models, packed bags, survival loss / c-index, the whole-slide pipeline."""
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zoo.models.mil import (
    ABMIL, MambaMIL, TransMIL, concordance_index, hazards_and_survival, nll_survival_loss, reorder_index,
)

IN = 12


def _bags(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, IN, generator=g) for n in sizes]


def _tiny(cls, **kw):
    torch.manual_seed(0)
    if cls is MambaMIL:
        kw = dict(dict(embed_dim=16, rate=3), **kw)
    elif cls is TransMIL:
        kw = dict(dict(embed_dim=16), **kw)
    else:
        kw = dict(dict(embed_dim=16, attn_dim=8), **kw)
    return cls(in_dim=IN, num_classes=3, drop_rate=0, **kw).eval()


# ---------------------------------------------------------------- official forward, restated

def _scan_ref(u, delta, A, B, C, D, z, delta_bias):
    """mamba-ssm's selective_scan_ref in its (batch, dim, length) layout, sequential."""
    delta = F.softplus(delta + delta_bias[:, None])
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[-1]):
        h = torch.exp(delta[..., t, None] * A) * h + delta[..., t, None] * B[:, None, :, t] * u[..., t, None]
        ys.append((h * C[:, None, :, t]).sum(-1))
    return (torch.stack(ys, -1) + D[:, None] * u) * F.silu(z)


def _inner_ref(xz, conv, x_proj, dt_proj, A_log, D, d_state):
    """mamba_inner_fn_no_out_proj: conv -> silu -> x_proj -> dt_proj -> gated scan."""
    length = xz.shape[-1]
    x, z = xz.chunk(2, dim=1)
    x = F.silu(F.conv1d(x, conv.weight, conv.bias, padding=conv.weight.shape[-1] - 1, groups=x.shape[1])[..., :length])
    dt, B, C = x_proj(x.transpose(1, 2)).split([dt_proj.weight.shape[1], d_state, d_state], dim=-1)
    delta = (dt @ dt_proj.weight.T).transpose(1, 2)
    return _scan_ref(x, delta, -torch.exp(A_log), B.transpose(1, 2), C.transpose(1, 2), D, z, dt_proj.bias)


def _srmamba_ref(m, h, rate):
    """The official SRMamba fast path: pad xz to a multiple of rate, "(k w) -> (w k)", scan, undo."""
    xz = (h @ m.in_proj.weight.T).transpose(1, 2)
    b, c, length = xz.shape
    out = _inner_ref(xz, m.conv1d, m.x_proj, m.dt_proj, m.A_log, m.D, m.d_state)
    xz_p = F.pad(xz, (0, (-length) % rate))
    k = xz_p.shape[-1] // rate
    xz_b = xz_p.reshape(b, c, k, rate).transpose(2, 3).reshape(b, c, k * rate)
    out_b = _inner_ref(xz_b, m.conv1d_b, m.x_proj_b, m.dt_proj_b, m.A_b_log, m.D_b, m.d_state)
    out_b = out_b.reshape(b, -1, rate, k).transpose(2, 3).reshape(b, -1, k * rate)[..., :length]
    return m.out_proj((out + out_b).transpose(1, 2))


def _mambamil_ref(model, x):
    """Official MambaMIL.forward (classification), one bag (n, in_dim)."""
    h = model._fc1(x[None])
    for layer in model.layers:
        h = _srmamba_ref(layer[1], layer[0](h), model.rate) + h
    h = model.norm(h)
    a = torch.softmax(model.attention(h).transpose(1, 2), dim=-1)
    return model.classifier(torch.bmm(a, h).squeeze(0))


def _perturb(model):
    # Official init zeroes every bias; random values make the check see each parameter.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))


@pytest.mark.parametrize("n,rate", [(11, 3), (12, 3), (2, 5), (9, 1)])
def test_mambamil_matches_official_forward(n, rate):
    model = _tiny(MambaMIL, rate=rate)
    _perturb(model)
    x = _bags([n])[0]
    with torch.no_grad():
        torch.testing.assert_close(model(x), _mambamil_ref(model, x), rtol=1e-4, atol=1e-5)


def test_official_parameter_names_and_checkpoint_filter():
    from zoo.models.mil.mambamil import checkpoint_filter_fn

    model = _tiny(MambaMIL)
    keys = set(model.state_dict())
    for k in ("_fc1.0.weight", "layers.1.0.weight", "layers.0.1.in_proj.weight", "layers.0.1.conv1d_b.weight",
              "layers.0.1.x_proj_b.weight", "layers.0.1.dt_proj_b.bias", "layers.0.1.A_b_log", "layers.0.1.D_b",
              "layers.0.1.out_proj.weight", "norm.weight", "attention.0.weight", "attention.2.bias", "classifier.weight"):
        assert k in keys, k
    # A DataParallel checkpoint from the official training code.
    official = {"module." + k: v + 1 for k, v in model.state_dict().items()}
    other = _tiny(MambaMIL)
    other.load_state_dict(checkpoint_filter_fn(official, other))
    torch.testing.assert_close(other.classifier.weight, model.classifier.weight + 1)


def test_reorder_index_is_a_stride_permutation():
    gather, scatter, cu_p = reorder_index(torch.tensor([0, 7, 10]), 3)
    pad = 10
    assert gather.tolist() == [0, 3, 6, 1, 4, pad, 2, 5, pad, 7, 8, 9]
    assert cu_p.tolist() == [0, 9, 12]
    assert torch.equal(gather[scatter], torch.arange(10))


def test_nystrom_equals_exact_attention_with_one_token_per_landmark():
    from zoo.models.mil import NystromAttention

    # With n == num_landmarks the landmarks are the tokens: A pinv(A) A v = A v.
    torch.manual_seed(0)
    approx = NystromAttention(16, dim_head=8, heads=2, num_landmarks=8, pinv_iterations=20)
    exact = NystromAttention(16, dim_head=8, heads=2, num_landmarks=8, exact=True)
    exact.load_state_dict(approx.state_dict())
    x = 3 * torch.randn(1, 8, 16)
    with torch.no_grad():
        torch.testing.assert_close(approx(x), exact(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cls,kw", [
    (MambaMIL, {}), (MambaMIL, {"mixer": "mamba"}), (MambaMIL, {"mixer": "bimamba"}),
    (ABMIL, {}), (ABMIL, {"gated": False}), (TransMIL, {}), (TransMIL, {"exact_attention": True}),
])
def test_packed_bags_equal_each_bag_alone(cls, kw):
    model = _tiny(cls, **kw)
    _perturb(model)
    bags = _bags([7, 1, 13, 4])
    with torch.no_grad():
        alone = torch.cat([model(b) for b in bags])
        listed = model(bags)
        cu = torch.tensor([0, 7, 8, 21, 25])
        packed = model(torch.cat(bags), cu_seqlens=cu)
        batched = model(torch.stack(_bags([5, 5], seed=1)))
        batched_alone = torch.cat([model(b) for b in _bags([5, 5], seed=1)])
    assert listed.shape == (4, 3)
    torch.testing.assert_close(listed, alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batched, batched_alone, rtol=1e-4, atol=1e-5)


def test_mambamil_packed_gradients_equal_per_bag():
    model = _tiny(MambaMIL)
    _perturb(model)
    bags = _bags([6, 10])
    model(bags).sum().backward()
    packed = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    sum(model(b).sum() for b in bags).backward()
    for a, b in zip(packed, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    model.zero_grad()
    model.set_grad_checkpointing()
    model(bags).sum().backward()
    for a, b in zip(packed, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_heads_and_features():
    model = _tiny(MambaMIL)
    bags = _bags([5, 8])
    feats, weights = model.forward_features(bags, return_attention=True)
    assert feats.shape == (2, 16) and weights.shape == (13,)
    torch.testing.assert_close(weights[:5].sum(), torch.tensor(1.0))
    model.reset_classifier(4)
    assert model(bags).shape == (2, 4)
    hazards, surv = hazards_and_survival(model(bags))
    assert bool((surv[:, 1:] <= surv[:, :-1]).all())


@pytest.mark.parametrize("cls", [MambaMIL, ABMIL, TransMIL])
def test_bad_input_errors(cls):
    model = _tiny(cls)
    with pytest.raises(ValueError, match=f"expected instance features of dim {IN}, got 7"):
        model(torch.randn(5, 7))
    with pytest.raises(ValueError, match=r"bags \[1\] are empty"):
        model([torch.randn(3, IN), torch.randn(0, IN)])
    with pytest.raises(ValueError, match="cu_seqlens must be"):
        model(torch.randn(6, IN), cu_seqlens=torch.tensor([0, 2, 5]))
    with pytest.raises(ValueError, match="empty list"):
        model([])


# ---------------------------------------------------------------- survival

def test_attention_pool_with_float32_scores_and_half_features():
    # Under CUDA autocast exp() runs in float32 while the features stay in half precision; pooling must
    # accept the mix (index_add refuses a source of another dtype than its target).
    from zoo.models.mil.bags import attention_pool

    scores, h = torch.randn(7), torch.randn(7, 4)
    cu = torch.tensor([0, 3, 7])
    pooled, w = attention_pool(scores, h.bfloat16(), cu)
    ref, _ = attention_pool(scores, h.bfloat16().float(), cu)
    assert pooled.dtype == torch.float32
    torch.testing.assert_close(pooled, ref, rtol=0, atol=0)
    torch.testing.assert_close(w[:3].sum(), torch.tensor(1.0))


def test_nll_survival_loss_by_hand():
    hazards = torch.tensor([[0.1, 0.2, 0.5], [0.3, 0.4, 0.6]])
    surv = torch.cumprod(1 - hazards, dim=1)
    y, c = torch.tensor([1, 2]), torch.tensor([0, 1])
    # Event in bin 1: -log S_0 - log h_1; censored through bin 2: -log S_2.
    expect = (-(math.log(0.9) + math.log(0.2)) - math.log(0.7 * 0.6 * 0.4)) / 2
    torch.testing.assert_close(nll_survival_loss(hazards, surv, y, c), torch.tensor(expect))
    # alpha = 1 keeps only the uncensored term.
    torch.testing.assert_close(nll_survival_loss(hazards, surv, y, c, alpha=1.0), torch.tensor(-(math.log(0.9) + math.log(0.2)) / 2))
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        nll_survival_loss(hazards, surv, torch.tensor([3, 0]), c)


def _cindex_brute(t, r, cens):
    num = den = 0.0
    for i, j in itertools.permutations(range(len(t)), 2):
        if cens[i]:
            continue
        if t[i] < t[j] or (t[i] == t[j] and cens[j]):
            den += 1
            num += 1.0 if r[i] > r[j] else 0.5 if r[i] == r[j] else 0.0
    return num / den


def test_concordance_index_against_pair_count():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(3, 25))
        t = rng.integers(0, 8, n).astype(float)  # many tied times
        r = rng.integers(0, 5, n).astype(float)  # many tied risks
        cens = rng.random(n) < 0.4
        cens[0] = False
        t[0] = -1  # at least one comparable pair
        assert concordance_index(t, r, cens) == pytest.approx(_cindex_brute(t, r, cens))
    assert concordance_index([1, 2, 3], [3, 2, 1]) == 1.0
    assert concordance_index([1, 2, 3], [1, 2, 3]) == 0.0


# ---------------------------------------------------------------- whole-slide pipeline

def _write_slide(path, mpp=0.25):
    """A 3-level pyramidal tiled TIFF: white background, a noisy stained ellipse of tissue."""
    tifffile = pytest.importorskip("tifffile")
    rng = np.random.default_rng(0)
    h, w = 1024, 1536
    img = np.full((h, w, 3), 236, np.uint8)
    yy, xx = np.mgrid[:h, :w]
    inside = ((yy - 500) / 380.0) ** 2 + ((xx - 700) / 560.0) ** 2 < 1
    img[inside] = np.stack([rng.integers(150, 210, inside.sum()), rng.integers(60, 120, inside.sum()),
                            rng.integers(140, 200, inside.sum())], axis=1)
    with tifffile.TiffWriter(path) as tw:
        level = img
        for i in range(3):
            res = 1e4 / (mpp * 2**i)  # pixels per cm
            tw.write(level, tile=(128, 128), photometric="rgb", compression="zlib", resolution=(res, res),
                     resolutionunit="CENTIMETER", subfiletype=0 if i == 0 else 1)
            level = level[::2, ::2]
    return inside


class _TinyNet(torch.nn.Module):
    def __init__(self, fail_after=None):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.calls, self.fail_after = 0, fail_after

    def forward(self, x):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("simulated crash")
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


def test_wsi_pipeline_tiles_tissue_and_resumes(tmp_path):
    wsi = pytest.importorskip("zoo.data.wsi")
    pytest.importorskip("openslide")
    slide_path = tmp_path / "slide.tiff"
    inside = _write_slide(slide_path)
    slide = wsi.open_slide(slide_path)
    assert slide.level_count == 3 and wsi.slide_mpp(slide) == pytest.approx(0.25)
    mask, down = wsi.tissue_mask(slide)
    assert down == 4 and abs(mask.mean() - inside[::4, ::4].mean()) < 0.02
    grid = wsi.tile_grid(slide, magnification=20, tile_size=32)  # 0.5 um/px: level 1, 64 level-0 px per tile
    assert grid.level == 1 and grid.read_size == 32 and len(grid.coords) > 50
    centers = grid.coords + 32
    assert inside[centers[:, 1], centers[:, 0]].mean() > 0.95
    with pytest.raises(ValueError, match="finer than the slide"):
        wsi.tile_grid(slide, magnification=80, tile_size=32)
    tiles = wsi._read_tiles(slide, grid, [0, 1])
    slide.close()

    kw = dict(magnification=20, tile_size=32, batch_size=16, save_every=1, progress=False, backbone_name="tiny")
    full = wsi.load_bag(wsi.extract_slide_features(slide_path, _TinyNet(), tmp_path / "full", **kw))
    assert full[0].shape == (len(grid.coords), 8) and torch.equal(full[1], torch.from_numpy(grid.coords))
    assert full[2]["num_tiles"] == len(grid.coords) and full[2]["backbone"] == "tiny"
    x = (torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) \
        / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(full[0][:2], _TinyNet()(x))

    with pytest.raises(RuntimeError, match="simulated crash"):
        wsi.extract_slide_features(slide_path, _TinyNet(fail_after=2), tmp_path / "resume", **kw)
    assert (tmp_path / "resume" / "slide.partial.safetensors").exists()
    net = _TinyNet()
    out = wsi.extract_slide_features(slide_path, net, tmp_path / "resume", **kw)
    assert net.calls == math.ceil(len(grid.coords) / 16) - 2  # only the batches not yet saved
    assert not (tmp_path / "resume" / "slide.partial.safetensors").exists()
    torch.testing.assert_close(wsi.load_bag(out)[0], full[0])
    # A finished bag is not recomputed; a bag feeds MambaMIL directly.
    assert wsi.extract_slide_features(slide_path, _TinyNet(fail_after=0), tmp_path / "resume", **kw) == out
    assert MambaMIL(in_dim=8, embed_dim=16, num_classes=2)(full[0]).shape == (1, 2)


def test_wsi_cli_with_timm_backbone_by_name(tmp_path, capsys):
    pytest.importorskip("openslide")
    import argparse

    from zoo.data.wsi import load_bag
    from zoo.tasks.mil import add_cli

    _write_slide(tmp_path / "s.tiff")
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    args = parser.parse_args(["mil", "extract", str(tmp_path / "s.tiff"), "--out", str(tmp_path / "bags"), "--backbone",
                              "resnet10t", "--no-pretrained", "--magnification", "10", "--tile-size", "32", "--device", "cpu"])
    assert args.func(args) == 0
    feats, coords, meta = load_bag(capsys.readouterr().out.split()[-1])
    assert meta["backbone"] == "resnet10t" and meta["magnification"] == 10 and feats.shape == (len(coords), 512)


def test_registered_entries():
    import zoo
    import zoo.models.mil  # noqa: F401  (registers the entries)

    names = set(zoo.list_models("*mil*"))
    assert {"mambamil", "mambamil_survival", "mambamil_mamba", "mambamil_bimamba", "abmil", "abmil_ungated", "transmil"} <= names
    model = zoo.create_model("mambamil_survival", in_dim=IN, embed_dim=16).eval()
    assert model.pretrained_cfg["num_classes"] == 4 and model.rate == 5
    assert model(_bags([6])[0]).shape == (1, 4)
    assert zoo.create_model("abmil", in_dim=IN, num_classes=3).gated
    with pytest.raises(ValueError, match="no pretrained weights"):
        zoo.create_model("mambamil", pretrained=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: autocast runs exp() in float32 only there")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mambamil_under_cuda_autocast_matches_float64(dtype):
    model = _tiny(MambaMIL)
    _perturb(model)
    bags = _bags([9, 20])
    with torch.no_grad():
        ref = model.double()(*[[b.double() for b in bags]])
        model.float().cuda()
        with torch.autocast("cuda", dtype=dtype):
            out = model([b.cuda() for b in bags])
    torch.testing.assert_close(out.double().cpu(), ref, rtol=0.05, atol=0.05)
