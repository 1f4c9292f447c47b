"""Mixers, norms and blocks against independent re-statements of mamba-ssm / Vim code paths."""
import math

import pytest
import torch
import torch.nn.functional as F

from zoo.core import BiMamba, Mamba, ResidualBlock, RMSNorm, add_norm, causal_conv1d, init_mamba_weights
from zoo.core.selective_scan import selective_scan_naive


def official_inner(xz, conv, x_proj, dt_proj, A_log, D, d_state):
    """mamba-ssm's mamba_inner_fn_no_out_proj in its own (batch, dim, length) layout, with the
    sequential oracle as the scan."""
    L = xz.shape[-1]
    x, z = xz.chunk(2, dim=1)
    x = F.silu(F.conv1d(x, conv.weight, conv.bias, padding=conv.weight.shape[-1] - 1, groups=x.shape[1])[..., :L])
    x_dbl = F.linear(x.transpose(1, 2).reshape(-1, x.shape[1]), x_proj.weight)  # ((b l), r + 2n)
    r = dt_proj.weight.shape[1]
    delta = (dt_proj.weight @ x_dbl[:, :r].t()).reshape(-1, xz.shape[0], L).permute(1, 0, 2)  # (b, d, l)
    B = x_dbl[:, r : r + d_state].reshape(xz.shape[0], L, d_state)
    C = x_dbl[:, r + d_state :].reshape(xz.shape[0], L, d_state)
    out = selective_scan_naive(x.transpose(1, 2), delta.transpose(1, 2), -torch.exp(A_log.float()), B, C, D.float(),
                               z.transpose(1, 2), dt_proj.bias.float(), True)
    return out.transpose(1, 2)  # (b, d, l)


def test_mamba_matches_official_formulation():
    torch.manual_seed(0)
    m = Mamba(24, d_state=5, d_conv=3, expand=1.5)
    x = torch.randn(2, 17, 24)
    xz = (x @ m.in_proj.weight.t()).transpose(1, 2)
    ref = official_inner(xz, m.conv1d, m.x_proj, m.dt_proj, m.A_log, m.D, 5)
    ref = F.linear(ref.transpose(1, 2), m.out_proj.weight)
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("divide_out", [True, False])
def test_bimamba_matches_vim_v2_with_flips(divide_out):
    torch.manual_seed(1)
    m = BiMamba(16, d_state=4, divide_out=divide_out)
    x = torch.randn(3, 11, 16)
    xz = (x @ m.in_proj.weight.t()).transpose(1, 2)
    out = official_inner(xz, m.conv1d, m.x_proj, m.dt_proj, m.A_log, m.D, 4)
    out_b = official_inner(xz.flip(-1), m.conv1d_b, m.x_proj_b, m.dt_proj_b, m.A_b_log, m.D_b, 4)
    y = (out + out_b.flip(-1)).transpose(1, 2)
    ref = F.linear(y / 2 if divide_out else y, m.out_proj.weight)
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)


def test_reverse_conv_is_flipped_causal_conv():
    x, w, b = torch.randn(2, 9, 5), torch.randn(5, 1, 4), torch.randn(5)
    ref = causal_conv1d(x.flip(1), w, b).flip(1)
    torch.testing.assert_close(causal_conv1d(x, w, b, reverse=True), ref)
    # causal: output t must not depend on inputs after t
    x2 = x.clone()
    x2[:, 5:] += 1
    torch.testing.assert_close(causal_conv1d(x2, w, b)[:, :5], causal_conv1d(x, w, b)[:, :5])


def test_official_init():
    torch.manual_seed(0)
    m = Mamba(64, d_state=16, dt_min=0.001, dt_max=0.1)
    assert m.dt_rank == math.ceil(64 / 16)
    torch.testing.assert_close(-torch.exp(m.A_log), -torch.arange(1, 17.0).repeat(128, 1))
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
    assert m.A_log._no_weight_decay and m.D._no_weight_decay
    m.apply(lambda mod: init_mamba_weights(mod, n_layer=4))
    assert m.dt_proj.bias.abs().min() > 0  # dt bias survives (marked _no_reinit)
    bound = 1 / math.sqrt(128) / math.sqrt(4)  # kaiming_uniform(a=sqrt 5) bound, rescaled by 1/sqrt(n_layer)
    assert m.out_proj.weight.abs().max() <= bound
    assert m.out_proj.weight.abs().max() > 0.9 * bound


def test_mixer_gradients_and_errors():
    m = BiMamba(8, d_state=3)
    x = torch.randn(2, 6, 8, requires_grad=True)
    m(x).sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in m.parameters())
    with pytest.raises(ValueError, match=r"expected input of shape \(batch, length, 8\), got \(2, 6, 7\)"):
        m(torch.randn(2, 6, 7))


def test_rmsnorm_and_block():
    norm = RMSNorm(6, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 3, 6, dtype=torch.bfloat16)
    ref = (x.double() / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.double())
    out = norm(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="expected last dimension 6"):
        norm(torch.randn(2, 5))

    block = ResidualBlock(6, mixer=torch.nn.Linear(6, 6), norm=norm)
    h = torch.randn(2, 3, 6)
    out1, res1 = block(h)  # first block: residual is the input
    torch.testing.assert_close(res1, h)
    torch.testing.assert_close(out1, block.mixer(norm(h)))
    out2, res2 = block(out1, res1)
    torch.testing.assert_close(res2, res1 + out1)
    normed, res = add_norm(out2.bfloat16(), res2, norm)
    assert res.dtype == torch.float32 and normed.dtype == torch.bfloat16


@pytest.mark.parametrize("norm_cls", [torch.nn.LayerNorm, RMSNorm])
def test_fp32_residual_with_a_half_precision_norm(norm_cls):
    # A model cast to bfloat16 keeps its residual in float32; the norm reads it in its weight's dtype, as
    # mamba-ssm's Block does, instead of refusing a float32 input.
    torch.manual_seed(0)
    block = ResidualBlock(8, torch.nn.Identity(), norm_cls(8)).to(torch.bfloat16)
    hidden, residual = torch.randn(2, 5, 8).bfloat16(), torch.randn(2, 5, 8)
    out, res = block(hidden, residual)
    assert res.dtype == torch.float32 and out.dtype == torch.bfloat16
    torch.testing.assert_close(res, residual + hidden.float())
    torch.testing.assert_close(out, block.norm(res.bfloat16()), rtol=0, atol=0)


def test_float64_residual_is_not_rounded_to_float32():
    norm = RMSNorm(8).double()
    hidden, residual = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    out, res = add_norm(hidden, residual, norm, residual_in_fp32=True)
    assert res.dtype == out.dtype == torch.float64
    assert torch.equal(res, residual + hidden)
    x = residual + hidden
    torch.testing.assert_close(out, x / x.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt(), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("reverse", [False, True])
def test_packed_conv_equals_separate(reverse):
    lens = [1, 5, 2, 9]
    xs = [torch.randn(1, l, 6) for l in lens]
    w, b = torch.randn(6, 1, 4), torch.randn(6)
    cu = torch.tensor([0, 1, 6, 8, 17])
    out = causal_conv1d(torch.cat(xs, 1), w, b, reverse=reverse, cu_seqlens=cu)
    ref = torch.cat([causal_conv1d(x, w, b, reverse=reverse) for x in xs], 1)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("cls", [Mamba, BiMamba])
def test_packed_mixer_equals_separate(cls):
    torch.manual_seed(2)
    m = cls(12, d_state=4)
    lens = [3, 1, 8]
    xs = [torch.randn(1, l, 12) for l in lens]
    out = m(torch.cat(xs, 1), cu_seqlens=torch.tensor([0, 3, 4, 12], dtype=torch.int32))
    torch.testing.assert_close(out, torch.cat([m(x) for x in xs], 1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="need batch 1, got batch 2"):
        m(torch.randn(2, 4, 12), cu_seqlens=torch.tensor([0, 4]))


def test_streaming_equals_full_sequence():
    torch.manual_seed(3)
    m = Mamba(10, d_state=4, d_conv=4)
    x = torch.randn(2, 23, 10)
    full = m(x)
    state, outs = None, []
    for piece in torch.split(x, [1, 2, 7, 13], dim=1):  # chunks shorter than the conv too
        y, state = m.forward_stream(piece, state)
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-6)
    with pytest.raises(NotImplementedError, match="BiMamba cannot stream"):
        BiMamba(10).forward_stream(x)
