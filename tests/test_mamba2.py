"""Mamba-2 mixers against a re-statement of mamba-ssm's Mamba2 forward (its reference path: conv1d, SiLU,
split, mamba_chunk_scan_combined, the gated RMSNorm of layernorm_gated.rms_norm_ref, out_proj) in float64."""
import math

import pytest
import torch
import torch.nn.functional as F

from zoo.core.mamba2 import BiMamba2, Mamba2
from zoo.core.norm import RMSNormGated

from test_ssd import closed_form

F64 = torch.float64


def rms_norm_ref(x, weight, z, eps, group_size, norm_before_gate):
    """layernorm_gated.rms_norm_ref (upcast=True), written out."""
    if z is not None and not norm_before_gate:
        x = x * F.silu(z)
    g = x.reshape(*x.shape[:-1], -1, group_size)
    out = (g / torch.sqrt(g.square().mean(-1, keepdim=True) + eps)).reshape(x.shape) * weight
    if z is not None and norm_before_gate:
        out = out * F.silu(z)
    return out


def official_forward(m, u, flip=False, suffix=""):
    """Mamba2.forward without the fused kernels (use_mem_eff_path=False), for one direction."""
    if flip:
        u = u.flip(1)
    zxbcdt = u @ m.in_proj.weight.T + (0 if m.in_proj.bias is None else m.in_proj.bias)
    d_mlp = (zxbcdt.shape[-1] - 2 * m.d_ssm - 2 * m.ngroups * m.d_state - m.nheads) // 2
    z0, x0, z, xBC, dt = torch.split(zxbcdt, [d_mlp, d_mlp, m.d_ssm, m.d_ssm + 2 * m.ngroups * m.d_state, m.nheads], -1)
    conv = getattr(m, "conv1d" + suffix)
    xBC = F.silu(F.conv1d(xBC.transpose(1, 2), conv.weight, conv.bias, padding=m.d_conv - 1, groups=xBC.shape[-1])
                 .transpose(1, 2)[:, : u.shape[1]])
    x, B, C = torch.split(xBC, [m.d_ssm, m.ngroups * m.d_state, m.ngroups * m.d_state], dim=-1)
    b, l = u.shape[:2]
    A = -torch.exp(getattr(m, "A" + suffix + "_log"))
    D = getattr(m, "D" + suffix)
    step = F.softplus(dt + getattr(m, "dt_bias" + suffix)).clamp(*m.dt_limit)
    y, _ = closed_form(x.reshape(b, l, m.nheads, m.headdim), step, A, B.reshape(b, l, m.ngroups, m.d_state),
                       C.reshape(b, l, m.ngroups, m.d_state), D=D.reshape(m.nheads, m.headdim) if m.D_has_hdim else D,
                       z=None if m.rmsnorm else z.reshape(b, l, m.nheads, m.headdim))
    y = y.reshape(b, l, m.d_ssm)
    if flip:
        y, z, z0, x0 = (t.flip(1) for t in (y, z, z0, x0))
    return y, z, z0, x0


def head(m, y, z, z0, x0):
    if m.rmsnorm:
        y = rms_norm_ref(y, m.norm.weight, z, 1e-5, m.d_ssm // m.ngroups, m.norm.norm_before_gate)
    if d_mlp := z0.shape[-1]:
        assert d_mlp == m.d_inner - m.d_ssm
        y = torch.cat([F.silu(z0) * x0, y], dim=-1)
    return y @ m.out_proj.weight.T + (0 if m.out_proj.bias is None else m.out_proj.bias)


def perturbed(m):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.double().eval()


CONFIGS = [
    dict(d_model=12, d_state=5, headdim=6, ngroups=2),
    dict(d_model=8, d_state=3, headdim=4, D_has_hdim=True, rmsnorm=False, bias=True),
    dict(d_model=10, d_state=4, headdim=5, d_ssm=10, norm_before_gate=True, dt_limit=(0.01, 0.5)),
    dict(d_model=9, d_state=2, headdim=3, ngroups=3, conv_bias=False, d_conv=3, chunk_size=4),
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_matches_restated_official_forward(cfg):
    torch.manual_seed(0)
    m = perturbed(Mamba2(**cfg))
    u = torch.randn(2, 11, cfg["d_model"], dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(m(u), head(m, *official_forward(m, u)), rtol=1e-10, atol=1e-10)


def test_parameter_names_and_shapes_are_mamba_ssm_s():
    d_model, d_state, headdim, ngroups, expand, d_conv = 64, 16, 32, 2, 2, 4
    m = Mamba2(d_model, d_state=d_state, headdim=headdim, ngroups=ngroups, expand=expand, d_conv=d_conv)
    d_inner = expand * d_model
    nheads = d_inner // headdim
    conv_dim = d_inner + 2 * ngroups * d_state
    want = {
        "in_proj.weight": (2 * d_inner + 2 * ngroups * d_state + nheads, d_model),
        "conv1d.weight": (conv_dim, 1, d_conv), "conv1d.bias": (conv_dim,),
        "dt_bias": (nheads,), "A_log": (nheads,), "D": (nheads,), "norm.weight": (d_inner,),
        "out_proj.weight": (d_model, d_inner),
    }
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == want


def test_official_init():
    torch.manual_seed(0)
    m = Mamba2(32, d_state=8, headdim=4, dt_min=0.01, dt_max=0.05, A_init_range=(2, 5))
    dt = F.softplus(m.dt_bias)
    assert dt.min() >= 0.01 - 1e-6 and dt.max() <= 0.05 + 1e-6
    A = m.A_log.exp()
    assert A.min() >= 2 and A.max() <= 5 and m.A_log.dtype == torch.float32
    assert torch.equal(m.D, torch.ones(16))
    assert all(getattr(p, "_no_weight_decay", False) for p in (m.dt_bias, m.A_log, m.D))


def test_bidirectional_is_forward_plus_flipped_forward():
    torch.manual_seed(0)
    m = perturbed(BiMamba2(12, d_state=4, headdim=6, ngroups=2))
    assert {"conv1d_b.weight", "dt_bias_b", "A_b_log", "D_b"} <= set(m.state_dict())
    u = torch.randn(2, 9, 12, dtype=F64)
    yf, z, z0, x0 = official_forward(m, u)
    yb, *_ = official_forward(m, u, flip=True, suffix="_b")
    with torch.no_grad():
        torch.testing.assert_close(m(u), head(m, (yf + yb) / 2, z, z0, x0), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cls", [Mamba2, BiMamba2])
def test_packed_sequences_equal_separate_calls(cls):
    torch.manual_seed(0)
    m = perturbed(cls(8, d_state=3, headdim=4, chunk_size=4))
    seqs = [torch.randn(1, n, 8, dtype=F64) for n in (5, 1, 9)]
    cu = torch.tensor([0, 5, 6, 15])
    with torch.no_grad():
        packed = m(torch.cat(seqs, dim=1), cu_seqlens=cu)
        torch.testing.assert_close(packed, torch.cat([m(s) for s in seqs], dim=1), rtol=1e-10, atol=1e-10)


def test_streaming_and_token_by_token_decoding_equal_the_full_forward():
    torch.manual_seed(0)
    m = perturbed(Mamba2(12, d_state=5, headdim=3, ngroups=2, d_ssm=12, chunk_size=4))
    u = torch.randn(2, 13, 12, dtype=F64)
    with torch.no_grad():
        full = m(u)
        out, state = m.forward_stream(u[:, :2])  # a prompt shorter than the conv window
        outs = [out]
        for s, e in ((2, 7), (7, 8), (8, 9), (9, 13)):
            out, state = m.forward_stream(u[:, s:e], state)
            outs.append(out)
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-10, atol=1e-10)
    assert state[0].shape == (2, 3, m.conv_dim) and state[1].shape == (2, m.nheads, m.headdim, 5)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    m = BiMamba2(8, d_state=3, headdim=4, d_ssm=4)
    m(torch.randn(2, 7, 8)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters()), \
        [n for n, p in m.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]


def test_gated_norm_module_matches_reference():
    torch.manual_seed(0)
    for before in (False, True):
        norm = RMSNormGated(12, group_size=4, norm_before_gate=before).double()
        with torch.no_grad():
            norm.weight.normal_()
        x, z = torch.randn(3, 5, 12, dtype=F64), torch.randn(3, 5, 12, dtype=F64)
        torch.testing.assert_close(norm(x, z), rms_norm_ref(x, norm.weight, z, 1e-5, 4, before))
        torch.testing.assert_close(norm(x), rms_norm_ref(x, norm.weight, None, 1e-5, 4, before))


def test_bad_configuration_and_input_errors():
    with pytest.raises(ValueError, match=r"headdim=5 must divide d_ssm=16"):
        Mamba2(8, headdim=5)
    with pytest.raises(ValueError, match=r"ngroups=3 must divide the number of heads d_ssm / headdim = 4"):
        Mamba2(8, headdim=4, ngroups=3)
    with pytest.raises(ValueError, match=r"d_state must be an integer >= 1, got 0"):
        Mamba2(8, d_state=0, headdim=4)
    with pytest.raises(ValueError, match=r"A_init_range must be \(low, high\) with 0 < low <= high"):
        Mamba2(8, headdim=4, A_init_range=(0, 16))
    m = Mamba2(8, d_state=4, headdim=4)
    with pytest.raises(ValueError, match=r"expected input of shape \(batch, length, 8\), got \(2, 5, 9\)"):
        m(torch.randn(2, 5, 9))
    with pytest.raises(ValueError, match="packed sequences .* need batch 1, got batch 2"):
        m(torch.randn(2, 5, 8), cu_seqlens=torch.tensor([0, 2, 5]))
    with pytest.raises(NotImplementedError, match="cannot stream"):
        BiMamba2(8, d_state=4, headdim=4).forward_stream(torch.randn(1, 3, 8))



@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the mixers' GPU paths")
@pytest.mark.parametrize("name", ["mamba2", "bimamba2", "hydra", "mamba2_negative"])
def test_cuda_matches_cpu_float64(name):
    from zoo.core.hydra import Hydra

    torch.manual_seed(0)
    make = {"mamba2": lambda: Mamba2(32, d_state=16, headdim=8, ngroups=2),
            "bimamba2": lambda: BiMamba2(32, d_state=16, headdim=8),
            "hydra": lambda: Hydra(32, d_state=16, headdim=8),
            "mamba2_negative": lambda: Mamba2(32, d_state=16, headdim=8, negative_eigenvalues=True)}[name]
    m = make()
    u = torch.randn(2, 67, 32)
    with torch.no_grad():
        ref = m.double()(u.double())
        out = m.float().cuda()(u.cuda())
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-3, atol=1e-3)
