"""Token dynamics (Vo et al., ICLR 2025): the scenario criterion, importance scores, the two
refinements as mixer options, and the ``zoo dynamics`` command."""
import pytest
import torch
import torch.nn.functional as F

from zoo.core import BiMamba, Mamba
from zoo.core.mamba import sort_matrix
from zoo.core.selective_scan import selective_scan
from zoo.research.token_dynamics import (
    classify, direction_matrices, enable_refinements, importance_scores, io_eigenvalues, token_dynamics_report,
)


def _set_bc(m: Mamba, s_b: torch.Tensor, s_c: torch.Tensor, suffix: str = "") -> None:
    w = getattr(m, "x_proj" + suffix).weight
    r, n = m.dt_rank, m.d_state
    with torch.no_grad():
        w[r : r + n] = s_b
        w[r + n : r + 2 * n] = s_c


def test_criterion_one_dimensional_sign():
    # d_inner = 1, d_state = 1: S_C^T S_B is the scalar mu of the paper's 1-D theorem.
    m = Mamba(1, d_state=1, expand=1, dt_rank=1)
    for mu_b, mu_c, expected in [(2.0, 3.0, "divergent"), (2.0, -3.0, "convergent"), (1.0, 0.0, "degenerate")]:
        _set_bc(m, torch.tensor([[mu_b]]), torch.tensor([[mu_c]]))
        mats = direction_matrices(m)
        assert classify(io_eigenvalues(mats["S_B"], mats["S_C"])) == expected


def test_criterion_matrix_cases():
    m = BiMamba(8, d_state=4, expand=1)
    s = torch.randn(4, 8)
    _set_bc(m, s, s)  # S_C^T S_B = S^T S: positive semi-definite
    _set_bc(m, s, -s, "_b")  # negative semi-definite
    reports = token_dynamics_report(m)
    assert [(r.direction, r.scenario, r.positive, r.negative) for r in reports] == [
        ("forward", "divergent", 4, 0), ("backward", "convergent", 0, 4)]
    # One positive, one negative eigenvalue: divergent (the paper's Figure 6, case B).
    _set_bc(m, torch.eye(4, 8), torch.diag(torch.tensor([1.0, -1.0, -2.0, -3.0])) @ torch.eye(4, 8))
    r = token_dynamics_report(m)[0]
    assert (r.scenario, r.positive, r.negative) == ("divergent", 1, 3)
    assert r.max_real == pytest.approx(1.0) and r.min_real == pytest.approx(-3.0)


def test_eigenvalues_are_the_nonzero_spectrum_of_sc_t_sb():
    s_b, s_c = torch.randn(3, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)
    big = torch.linalg.eigvals(s_c.T @ s_b)
    big = big[big.abs() > 1e-9]
    small = io_eigenvalues(s_b, s_c)
    key = lambda z: (round(z.real, 6), round(z.imag, 6))  # noqa: E731
    assert sorted(map(key, big.tolist())) == sorted(map(key, small.tolist()))


def test_importance_scores_against_direct_computation():
    torch.manual_seed(0)
    m = Mamba(6, d_state=3, d_conv=3, expand=2, dt_rank=2)
    h = torch.randn(2, 5, 6)
    scores = importance_scores(m, h)
    for b in range(2):
        for t in range(5):
            # x_t by hand: in_proj's x half, causal depthwise conv over t-2..t, SiLU.
            xin = h[b] @ m.in_proj.weight[: m.d_inner].T  # (5, d_inner)
            acc = m.conv1d.bias.clone()
            for j in range(3):
                if t - j >= 0:
                    acc = acc + m.conv1d.weight[:, 0, 2 - j] * xin[t - j]
            x = F.silu(acc)
            step = m.dt_proj.weight @ (m.x_proj.weight[:2] @ x) + m.dt_proj.bias
            assert scores[b, t].item() == pytest.approx(step.mean().item(), abs=1e-5)
    # With the reordering refinement the learned K is used.
    m.enable_refinements(reorder_tokens=True)
    with torch.no_grad():
        m.importance.weight.normal_()
    x = F.silu(F.conv1d(m.in_proj(h)[..., : m.d_inner].transpose(1, 2), m.conv1d.weight, m.conv1d.bias,
                        padding=2, groups=m.d_inner)[..., :5]).transpose(1, 2)
    expected = m.importance(m.dt_proj(m.x_proj(x)[..., :2])).squeeze(-1)
    torch.testing.assert_close(importance_scores(m, h), expected, atol=1e-5, rtol=1e-5)


def test_defaults_unchanged():
    names = set(dict(BiMamba(16).named_parameters()))
    assert names == {"in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight", "dt_proj.bias",
                     "A_log", "D", "out_proj.weight", "conv1d_b.weight", "conv1d_b.bias", "x_proj_b.weight",
                     "dt_proj_b.weight", "dt_proj_b.bias", "A_b_log", "D_b"}


@pytest.mark.parametrize("sign", ["positive", "negative", "mixed"])
def test_bc_sign_fixes_the_scenario_and_equals_tied_rows(sign):
    torch.manual_seed(1)
    m = BiMamba(8, d_state=4, bc_sign=sign)
    with torch.no_grad():
        m.C_gain.normal_()
        m.C_b_gain.normal_()
    expected = {"positive": (4, 0), "negative": (0, 4), "mixed": (2, 2)}[sign]  # eigenvalues > 0, < 0
    for r in token_dynamics_report(m):
        assert (r.positive, r.negative) == expected
        assert r.scenario == ("convergent" if sign == "negative" else "divergent")
    # The option equals a plain mixer whose C rows are +-G times its B rows.
    plain = BiMamba(8, d_state=4)
    plain.load_state_dict(m.state_dict(), strict=False)
    for suffix in ("", "_b"):
        mats = direction_matrices(m, suffix)
        _set_bc(plain, mats["S_B"], mats["S_C"], suffix)
    h = torch.randn(2, 6, 8)
    torch.testing.assert_close(m(h), plain(h), atol=1e-5, rtol=1e-5)


def test_sort_matrix_is_a_permutation_with_softsort_gradient():
    s = torch.tensor([[0.3, 2.0, -1.0, 0.5]], requires_grad=True)
    p = sort_matrix(s, tau=0.5)
    assert torch.equal(p.detach(), F.one_hot(torch.tensor([[1, 3, 0, 2]]), 4).float())
    (p @ torch.arange(4.0).view(1, 4, 1)).sum().backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_reorder_tokens_scans_in_importance_order():
    torch.manual_seed(2)
    m = Mamba(8, d_state=4, reorder_tokens=True)
    with torch.no_grad():
        m.importance.weight.normal_()
    h = torch.randn(2, 7, 8)
    out = m(h)
    # Reference: permute the scan input by the score, scan, un-permute, gate.
    x, z = m.in_proj(h).chunk(2, dim=-1)
    x = F.silu(F.conv1d(x.transpose(1, 2), m.conv1d.weight, m.conv1d.bias, padding=3, groups=m.d_inner)[..., :7]).transpose(1, 2)
    order = m.importance(m.dt_proj(m.x_proj(x)[..., : m.dt_rank])).squeeze(-1).argsort(-1)  # most important last
    xs = torch.gather(x, 1, order[..., None].expand_as(x))
    dt, B, C = torch.split(m.x_proj(xs), [m.dt_rank, 4, 4], dim=-1)
    y = selective_scan(xs, F.linear(dt, m.dt_proj.weight), -torch.exp(m.A_log), B, C, D=m.D, delta_bias=m.dt_proj.bias,
                       delta_softplus=True)
    y = torch.empty_like(y).scatter_(1, order[..., None].expand_as(y), y) * F.silu(z)
    torch.testing.assert_close(out, m.out_proj(y), atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert m.importance.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="reorder_tokens"):
        m(h[:1], cu_seqlens=torch.tensor([0, 3, 7]))


def test_soft_reordering_scans_the_softsort_mixture():
    """reorder_tokens='soft' (the authors' released code): the scan input is P_soft x, the output P_soft^T y."""
    torch.manual_seed(4)
    m = Mamba(8, d_state=4, reorder_tokens="soft", reorder_tau=0.7)
    with torch.no_grad():
        m.importance.weight.normal_()
    h = torch.randn(2, 6, 8)
    x, z = m.in_proj(h).chunk(2, dim=-1)
    x = F.silu(F.conv1d(x.transpose(1, 2), m.conv1d.weight, m.conv1d.bias, padding=3, groups=m.d_inner)[..., :6]).transpose(1, 2)
    score = m.importance(m.dt_proj(m.x_proj(x)[..., : m.dt_rank])).squeeze(-1)
    ascending = score.sort(-1).values
    p = torch.softmax(-(ascending[..., :, None] - score[..., None, :]).abs() / 0.7, dim=-1)  # written out, not sort_matrix
    xs = p @ x
    dt, B, C = torch.split(m.x_proj(xs), [m.dt_rank, 4, 4], dim=-1)
    y = selective_scan(xs, F.linear(dt, m.dt_proj.weight), -torch.exp(m.A_log), B, C, D=m.D, delta_bias=m.dt_proj.bias,
                       delta_softplus=True)
    soft_out = m(h)
    torch.testing.assert_close(soft_out, m.out_proj((p.transpose(1, 2) @ y) * F.silu(z)), atol=1e-5, rtol=1e-5)
    m.enable_refinements(reorder_tokens=True)
    assert (m(h) - soft_out).abs().max() > 1e-3  # the hard permutation gives another output
    with pytest.raises(ValueError, match="reorder_tokens must be False, True or 'soft'"):
        Mamba(8, reorder_tokens="sometimes")


def test_enable_refinements_on_a_zoo_model_and_cli(capsys):
    import zoo
    from zoo.cli import main

    model = zoo.create_model("vim_tiny", img_size=16, patch_size=4, stride=4, depth=1, embed_dim=32, num_classes=3)
    enable_refinements(model, bc_sign="positive", reorder_tokens=True)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 3)
    assert {r.scenario for r in token_dynamics_report(model)} == {"divergent"}
    assert main(["dynamics", "vim_tiny", "--input-size", "3,16,16", "--set", "img_size=16", "patch_size=4", "stride=4", "depth=2",
                 "embed_dim=32"]) == 0
    out = capsys.readouterr().out
    assert "layers.1.mixer" in out and "4 directions" in out
    assert main(["dynamics", "vim_tiny", "--json", "--params-only", "--set", "depth=1", "embed_dim=32"]) == 0
    assert '"scenario"' in capsys.readouterr().out
    assert main(["dynamics", "abmil", "--params-only"]) == 2  # no Mamba mixer: an error, not a traceback
    assert "has no Mamba mixer" in capsys.readouterr().err


def test_bc_sign_rejects_unknown_values():
    with pytest.raises(ValueError, match="bc_sign must be one of .* got 'sometimes'"):
        Mamba(8, bc_sign="sometimes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_refinements_on_cuda_match_cpu_float64():
    """Both refinements through the Triton scan: outputs and gradients equal the CPU float64 path."""
    import zoo

    torch.manual_seed(5)
    model = zoo.create_model("vim_tiny", img_size=16, patch_size=4, stride=4, depth=2, embed_dim=48, num_classes=10)
    enable_refinements(model, bc_sign="positive", reorder_tokens=True)
    for name, p in model.named_parameters():
        if name.endswith("importance.weight") or name.endswith("importance_b.weight"):
            with torch.no_grad():
                p.normal_()  # distinct scores: no ties for the two sorts to break differently
    images = torch.randn(3, 3, 16, 16)
    ref = model.double()
    ref(images.double()).square().sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    ref_out = ref(images.double()).detach()
    gpu = ref.float().cuda()
    gpu.zero_grad()
    out = gpu(images.cuda())
    out.square().sum().backward()
    torch.testing.assert_close(out.double().cpu(), ref_out, atol=1e-4, rtol=1e-4)
    for n, p in gpu.named_parameters():
        torch.testing.assert_close(p.grad.double().cpu(), ref_grads[n], atol=1e-3, rtol=1e-3, msg=n)
