"""Hydra against a re-statement of goombalab/hydra's Hydra.forward (its unfused path: flipped copies, scan,
roll by one step, fc_D diagonal, gated RMSNorm) in float64, with the SSD scan written as a closed form."""
import pytest
import torch
import torch.nn.functional as F

from zoo.core.hydra import Hydra

from test_mamba2 import perturbed, rms_norm_ref
from test_ssd import closed_form

F64 = torch.float64


def official_forward(m, u):
    batch, seqlen, _ = u.shape
    gn, h = m.ngroups * m.d_state, m.nheads
    zxbcdt = u @ m.in_proj.weight.T + (0 if m.in_proj.bias is None else m.in_proj.bias)
    z, xBC, dt = torch.split(zxbcdt, [m.d_inner, m.d_inner + 4 * gn, 2 * h], dim=-1)
    dt = torch.cat((dt[:, :, :h], torch.flip(dt[:, :, h:], (1,))), dim=0)
    dt = F.softplus(dt + m.dt_bias).clamp(*m.dt_limit)
    xBC = F.silu(F.conv1d(xBC.transpose(1, 2), m.conv1d.weight, m.conv1d.bias, padding=m.d_conv // 2,
                          groups=xBC.shape[-1]).transpose(1, 2))
    x, BC = torch.split(xBC, [m.d_inner, 4 * gn], dim=-1)
    x_og = x
    x = torch.cat((x, torch.flip(x, (1,))), dim=0)
    BC = torch.cat((BC[:, :, :2 * gn], torch.flip(BC[:, :, 2 * gn:], (1,))), dim=0)
    B, C = torch.split(BC, [gn, gn], dim=-1)
    h0 = m.init_states.expand(2 * batch, -1, -1, -1) if m.learnable_init_states else None
    y, _ = closed_form(x.reshape(2 * batch, seqlen, h, m.headdim), dt, -torch.exp(m.A_log),
                       B.reshape(2 * batch, seqlen, m.ngroups, m.d_state), C.reshape(2 * batch, seqlen, m.ngroups, m.d_state),
                       h0=h0)
    y = y.reshape(2 * batch, seqlen, m.d_inner)
    y = torch.roll(y, shifts=1, dims=1)
    y[:, 0, :] = 0.0
    y_fw, y_bw = y[:batch], torch.flip(y[batch:], (1,))
    diag = (x_og @ m.fc_D.weight.T + m.D).repeat_interleave(m.headdim, dim=-1)
    y = y_fw + y_bw + x_og * diag
    y = rms_norm_ref(y, m.norm.weight, z, 1e-5, m.d_inner, norm_before_gate=True)
    return y @ m.out_proj.weight.T + (0 if m.out_proj.bias is None else m.out_proj.bias)


@pytest.mark.parametrize("cfg", [
    dict(d_model=8, d_state=3, headdim=4, d_conv=7),
    dict(d_model=12, d_state=2, headdim=6, ngroups=2, d_conv=3, bias=True, dt_limit=(0.05, 0.6), chunk_size=4),
    dict(d_model=6, d_state=4, headdim=3, learnable_init_states=True, d_conv=5),
])
def test_matches_restated_official_forward(cfg):
    torch.manual_seed(0)
    m = perturbed(Hydra(**cfg))
    u = torch.randn(2, 9, cfg["d_model"], dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(m(u), official_forward(m, u), rtol=1e-10, atol=1e-10)


def test_every_token_sees_the_whole_sequence():
    torch.manual_seed(0)
    m = Hydra(8, d_state=3, headdim=4, d_conv=3).double()
    u = torch.randn(1, 12, 8, dtype=F64, requires_grad=True)
    m(u)[0, 5].sum().backward()
    assert (u.grad[0].abs().sum(-1) > 0).all()


def test_packed_sequences_equal_separate_calls():
    torch.manual_seed(0)
    m = perturbed(Hydra(8, d_state=3, headdim=4, d_conv=5, chunk_size=4))
    seqs = [torch.randn(1, n, 8, dtype=F64) for n in (6, 1, 10)]
    with torch.no_grad():
        packed = m(torch.cat(seqs, dim=1), cu_seqlens=torch.tensor([0, 6, 7, 17]))
        torch.testing.assert_close(packed, torch.cat([m(s) for s in seqs], dim=1), rtol=1e-10, atol=1e-10)


def test_parameter_names_and_shapes_are_the_official_ones():
    m = Hydra(16, d_state=8, headdim=8, ngroups=1, learnable_init_states=True)
    d_inner, nheads = 32, 4
    conv_dim = d_inner + 4 * 8
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == {
        "in_proj.weight": (2 * d_inner + 4 * 8 + 2 * nheads, 16), "conv1d.weight": (conv_dim, 1, 7),
        "conv1d.bias": (conv_dim,), "init_states": (nheads, 8, 8), "dt_bias": (nheads,), "A_log": (nheads,),
        "D": (nheads,), "fc_D.weight": (nheads, d_inner), "norm.weight": (d_inner,), "out_proj.weight": (16, d_inner),
    }
    assert torch.equal(m.A_log, torch.zeros(nheads))  # A = -1, the official init


def test_bad_configuration_errors():
    with pytest.raises(ValueError, match="d_conv must be odd"):
        Hydra(8, headdim=4, d_conv=4)
    with pytest.raises(ValueError, match="headdim=5 must divide d_inner=16"):
        Hydra(8, headdim=5)
    with pytest.raises(ValueError, match=r"expected input of shape \(batch, length, 8\)"):
        Hydra(8, headdim=4)(torch.randn(1, 3, 7))
