"""S-Mamba against a restatement of the official forward (model/S_Mamba.py with mamba-ssm's Mamba):
official module names and layouts, flip -> Mamba -> flip for the backward direction, the sequential
scan oracle; plus entries, checkpoint conversion, input checks and gradients."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zoo
from zoo.core.mamba import Mamba
from zoo.core.precision import upcast
from zoo.core.selective_scan import selective_scan_naive
from zoo.models.timeseries import SMamba, SMambaClassifier, checkpoint_filter_fn

torch.set_num_threads(1)
TINY = dict(seq_len=12, pred_len=5, d_model=16, d_state=4, d_ff=24, e_layers=2)


class OfficialLayer(nn.Module):
    """The official EncoderLayer's parameters, names and layouts (FFN as kernel-1 Conv1d)."""

    def __init__(self, d_model, d_state, d_ff):
        super().__init__()
        self.attention = Mamba(d_model, d_state=d_state, d_conv=2, expand=1)
        self.attention_r = Mamba(d_model, d_state=d_state, d_conv=2, expand=1)
        self.conv1 = nn.Conv1d(d_model, d_ff, kernel_size=1)
        self.conv2 = nn.Conv1d(d_ff, d_model, kernel_size=1)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)


class Official(nn.Module):
    def __init__(self, seq_len, pred_len, d_model, d_state, d_ff, e_layers):
        super().__init__()
        self.pred_len = pred_len
        self.enc_embedding = nn.Module()
        self.enc_embedding.value_embedding = nn.Linear(seq_len, d_model)
        self.encoder = nn.Module()
        self.encoder.attn_layers = nn.ModuleList(OfficialLayer(d_model, d_state, d_ff) for _ in range(e_layers))
        self.encoder.norm = nn.LayerNorm(d_model)
        self.projector = nn.Linear(d_model, pred_len)


def mamba_ref(m: Mamba, x):
    """mamba-ssm's Mamba.forward (no inference cache), the scan done by the sequential oracle."""
    L = x.shape[1]
    xz = x @ m.in_proj.weight.T
    u, z = xz.chunk(2, dim=-1)
    u = F.conv1d(u.transpose(1, 2), m.conv1d.weight, m.conv1d.bias, padding=m.d_conv - 1, groups=m.d_inner)[..., :L]
    u = F.silu(u).transpose(1, 2)
    dt, B, C = torch.split(u @ m.x_proj.weight.T, [m.dt_rank, m.d_state, m.d_state], dim=-1)
    dt = dt @ m.dt_proj.weight.T
    A = -torch.exp(upcast(m.A_log))
    y = selective_scan_naive(u, dt, A, B, C, D=upcast(m.D), z=z, delta_bias=upcast(m.dt_proj.bias), delta_softplus=True)
    return y @ m.out_proj.weight.T


def official_forward(model: Official, x_enc, x_mark=None):
    """S_Mamba.Model.forecast in eval mode (dropout off)."""
    means = x_enc.mean(1, keepdim=True)
    x_enc = x_enc - means
    stdev = torch.sqrt(torch.var(x_enc, dim=1, keepdim=True, unbiased=False) + 1e-5)
    x_enc = x_enc / stdev
    N = x_enc.shape[2]
    x = x_enc.permute(0, 2, 1)
    if x_mark is not None:
        x = torch.cat([x, x_mark.permute(0, 2, 1)], 1)
    x = model.enc_embedding.value_embedding(x)
    for layer in model.encoder.attn_layers:
        new_x = mamba_ref(layer.attention, x) + mamba_ref(layer.attention_r, x.flip(dims=[1])).flip(dims=[1])
        y = x = layer.norm1(x + new_x)
        y = F.gelu(layer.conv1(y.transpose(-1, 1)))
        y = layer.conv2(y).transpose(-1, 1)
        x = layer.norm2(x + y)
    x = model.encoder.norm(x)
    dec = model.projector(x).permute(0, 2, 1)[:, :, :N]
    return dec * stdev[:, 0, :].unsqueeze(1) + means[:, 0, :].unsqueeze(1)


def _official_and_converted():
    torch.manual_seed(0)
    ref = Official(**TINY)
    with torch.no_grad():  # move D and the norms off their constant inits so they matter
        for p in ref.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    sd = ref.state_dict()
    # The official EncoderLayer also holds modules its forward never uses; conversion drops them.
    sd["encoder.attn_layers.0.man.in_proj.weight"] = torch.zeros(22, 11)
    sd["encoder.attn_layers.1.a.query_projection.weight"] = torch.zeros(11, 11)
    model = SMamba(**TINY).eval()
    model.load_state_dict(checkpoint_filter_fn(sd, model))
    return ref, model


def test_matches_official_forward():
    ref, model = _official_and_converted()
    x = torch.randn(3, 12, 5) * 4 + 2
    with torch.no_grad():
        out, want = model(x), official_forward(ref, x)
    assert out.shape == (3, 5, 5)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_matches_official_forward_with_timestamp_tokens():
    ref, model = _official_and_converted()
    x, marks = torch.randn(2, 12, 3), torch.rand(2, 12, 4) - 0.5
    with torch.no_grad():
        out, want = model(x, marks), official_forward(ref, x, marks)
    assert out.shape == (2, 5, 3)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_backward_direction_reads_tokens_reversed():
    """Permuting the variates permutes the forecast only through the token order the Mambas see."""
    torch.manual_seed(1)
    model = SMamba(**TINY).eval()
    x = torch.randn(2, 12, 6)
    with torch.no_grad():
        y = model(x)
        # Swapping the two Mambas and reversing the variate order gives the reversed forecast.
        for layer in model.encoder.layers:
            layer.mixer, layer.mixer_r = layer.mixer_r, layer.mixer
        y_rev = model(x.flip(2))
    torch.testing.assert_close(y_rev, y.flip(2), rtol=1e-5, atol=1e-5)


def test_gradients_reach_every_parameter():
    torch.manual_seed(2)
    model = SMamba(**TINY)
    x, target = torch.randn(4, 12, 3), torch.randn(4, 5, 3)
    F.mse_loss(model(x), target).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_input_checks_name_expected_shape():
    model = SMamba(**TINY, enc_in=4)
    with pytest.raises(ValueError, match=r"expected input of shape \(batch, 12, 4\), got \(2, 12, 3\)"):
        model(torch.randn(2, 12, 3))
    with pytest.raises(ValueError, match=r"expected input of shape \(batch, 12, 4\), got \(2, 10, 4\)"):
        model(torch.randn(2, 10, 4))
    with pytest.raises(ValueError, match="x_mark"):
        model(torch.randn(2, 12, 4), torch.randn(2, 11, 4))


def test_any_number_of_variates_without_enc_in():
    model = SMamba(**TINY).eval()
    for n in (1, 2, 9):
        assert model(torch.randn(2, 12, n)).shape == (2, 5, n)


def test_published_entries_and_tags():
    m = zoo.create_model("smamba_etth1.h336")
    assert (m.pred_len, m.num_features, len(m.encoder.layers), m.enc_in) == (336, 256, 2, 7)
    assert m.pretrained_cfg["tag"] == "h336" and "lr 5e-05" in m.pretrained_cfg["notes"]
    m = zoo.create_model("smamba-weather", seq_len=24, pred_len=8, d_model=32, d_ff=32)  # default tag h96
    assert m.pretrained_cfg["tag"] == "h96" and len(m.encoder.layers) == 3 and m.encoder.layers[0].mixer.d_state == 2
    assert m(torch.randn(1, 24, 21)).shape == (1, 8, 21)
    assert zoo.model_info("smamba_pems08")["tags"] == ["h12", "h24", "h48", "h96"]
    with pytest.raises(ValueError, match=r"unknown horizon tag 'h100'; expected one of \['h96', 'h192', 'h336', 'h720'\]"):
        zoo.create_model("smamba_etth1.h100")


def test_classifier_on_the_same_encoder():
    torch.manual_seed(3)
    clf = zoo.create_model("smamba_classifier", seq_len=20, num_classes=3, d_model=16, d_state=4, d_ff=16)
    assert isinstance(clf, SMambaClassifier)
    x = torch.randn(5, 20, 4)
    logits = clf(x)
    assert logits.shape == (5, 3)
    assert clf.forward_head(clf.forward_features(x), pre_logits=True).shape == (5, 16)
    clf.reset_classifier(7)
    assert clf(x).shape == (5, 7)


def test_classifier_patch_tokens():
    torch.manual_seed(4)
    clf = SMambaClassifier(seq_len=10, num_classes=2, patch_len=4, d_model=8, d_state=2, d_ff=8).eval()
    x = torch.randn(3, 10, 2)
    assert clf(x).shape == (3, 2)
    assert clf.forward_features(x).shape == (3, 2 * 3, 8)  # 2 variates x ceil(10 / 4) patches
    with pytest.raises(ValueError, match="patch_len must be in 1..seq_len=10, got 11"):
        SMambaClassifier(seq_len=10, num_classes=2, patch_len=11)
