"""The SSD (Mamba-2) scan op: the sequential oracle against an independent statement, every path against the
oracle in float64 (values, final states, all gradients) on odd sizes, packed sequences, reverse, the one-step
update, and bad input."""
import pytest
import torch
import torch.nn.functional as F

from zoo.core.selective_scan import selective_scan_naive
from zoo.core.ssd import ssd_scan, ssd_scan_chunked, ssd_scan_naive, ssd_step

F64 = torch.float64


def make(b=2, l=29, h=6, p=5, g=3, n=7, dtype=F64, seed=0, D_per_channel=False):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=F64).to(dtype)  # noqa: E731
    return dict(
        x=r(b, l, h, p), dt=r(b, l, h), A=-torch.rand(h, generator=gen, dtype=F64).mul(2).add(0.1).to(dtype),
        B=r(b, l, g, n), C=r(b, l, g, n), D=r(h, p) if D_per_channel else r(h), z=r(b, l, h, p), dt_bias=r(h),
    )


def closed_form(x, dt, A, B, C, D=None, z=None, dt_bias=None, softplus=False, reverse=False, h0=None):
    """O(L^2) statement, independent of any recurrence code: S_t = P(t, start) S0 + sum_{s in past(t)}
    P(t, s) dt_s x_s B_s^T with P(t, s) = exp(A * sum of dt over the steps after s up to t)."""
    x, dt, A, B, C = (t.double() for t in (x, dt, A, B, C))
    if dt_bias is not None:
        dt = dt + dt_bias.double()
    if softplus:
        dt = F.softplus(dt)
    b, l, h, p = x.shape
    rep = h // B.shape[2]
    Bh, Ch = B.repeat_interleave(rep, dim=2), C.repeat_interleave(rep, dim=2)
    order = list(range(l))[::-1] if reverse else list(range(l))
    y = torch.zeros(b, l, h, p, dtype=F64)
    S = None
    for i, t in enumerate(order):
        past = order[: i + 1]
        S = torch.zeros(b, h, p, B.shape[-1], dtype=F64)
        for k, s in enumerate(past):
            decay = torch.exp(A * sum((dt[:, r] for r in past[k + 1:]), torch.zeros(b, h, dtype=F64)))
            S = S + (decay * dt[:, s])[..., None, None] * x[:, s, :, :, None] * Bh[:, s, :, None, :]
        if h0 is not None:
            S = S + torch.exp(A * sum((dt[:, r] for r in past), torch.zeros(b, h, dtype=F64)))[..., None, None] * h0
        y[:, t] = (S * Ch[:, t, :, None, :]).sum(-1)
    if D is not None:
        y = y + x * (D.double()[:, None] if D.dim() == 1 else D.double())
    if z is not None:
        y = y * F.silu(z.double())
    return y, S


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("D_per_channel", [False, True])
def test_oracle_matches_closed_form(reverse, D_per_channel):
    a = make(b=2, l=7, h=4, p=3, g=2, n=5, D_per_channel=D_per_channel)
    h0 = torch.randn(2, 4, 3, 5, dtype=F64)
    out, last = ssd_scan(**a, dt_softplus=True, initial_state=h0, reverse=reverse, return_final_state=True, impl="naive")
    ref, ref_last = closed_form(**a, softplus=True, reverse=reverse, h0=h0)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(last, ref_last, rtol=1e-12, atol=1e-12)


def test_oracle_equals_the_selective_scan_oracle_with_shared_head_parameters():
    # mamba-ssm's ssd_selective_scan: the SSD scan is Mamba-1's with A, dt, D repeated over a head's channels.
    a = make(b=1, l=11, h=3, p=4, g=1, n=6)
    step = F.softplus(a["dt"] + a["dt_bias"])
    out = ssd_scan_naive(a["x"], step, a["A"], a["B"], a["C"], a["D"], a["z"])[0]
    ref = selective_scan_naive(
        a["x"].reshape(1, 11, 12), step.repeat_interleave(4, dim=2), a["A"].repeat_interleave(4)[:, None].expand(12, 6),
        a["B"][:, :, 0], a["C"][:, :, 0], D=a["D"].repeat_interleave(4), z=a["z"].reshape(1, 11, 12),
    )
    torch.testing.assert_close(out.reshape(1, 11, 12), ref, rtol=1e-12, atol=1e-12)


CASES = [  # (b, l, h, p, g, n, chunk_size): odd sizes, one chunk, many chunks, a partial last chunk
    (2, 29, 6, 5, 3, 7, 8),
    (1, 64, 4, 8, 1, 16, 64),
    (3, 17, 2, 3, 2, 1, 5),
    (1, 1, 3, 2, 1, 4, 4),
    (2, 40, 8, 4, 4, 9, 16),
]


@pytest.mark.parametrize("impl", ["chunked", "selective"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("reverse", [False, True])
def test_paths_match_the_oracle_values_and_states(impl, case, reverse):
    b, l, h, p, g, n, cs = case
    a = make(b, l, h, p, g, n, D_per_channel=case[0] == 2)
    h0 = torch.randn(b, h, p, n, dtype=F64)
    kw = dict(dt_softplus=True, initial_state=h0, reverse=reverse, return_final_state=True)
    out, last = ssd_scan(**a, **kw, impl=impl, chunk_size=cs)
    ref, ref_last = ssd_scan(**a, **kw, impl="naive")
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(last, ref_last, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", ["chunked", "selective"])
@pytest.mark.parametrize("reverse", [False, True])
def test_all_gradients_match_the_oracle(impl, reverse):
    a = make(b=2, l=13, h=4, p=3, g=2, n=5, D_per_channel=reverse)
    h0 = torch.randn(2, 4, 3, 5, dtype=F64)
    grads = {}
    for path in (impl, "naive"):
        leaves = {k: v.clone().requires_grad_() for k, v in {**a, "h0": h0}.items()}
        args = {k: v for k, v in leaves.items() if k != "h0"}
        out, last = ssd_scan(**args, initial_state=leaves["h0"], dt_softplus=True, reverse=reverse,
                             return_final_state=True, impl=path, chunk_size=4)
        g_out, g_last = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=F64), torch.ones_like(last)
        torch.autograd.backward((out, last), (g_out, g_last))
        grads[path] = {k: v.grad for k, v in leaves.items()}
    for k, ref in grads["naive"].items():
        assert ref is not None and ref.abs().sum() > 0, k
        torch.testing.assert_close(grads[impl][k], ref, rtol=1e-9, atol=1e-9, msg=k)


def test_oracle_gradients_are_those_of_the_closed_form():
    a = make(b=1, l=5, h=2, p=2, g=1, n=3)
    leaves = {k: v.clone().requires_grad_() for k, v in a.items()}
    ssd_scan(**leaves, dt_softplus=True, impl="naive").sum().backward()
    ref = {k: v.clone().requires_grad_() for k, v in a.items()}
    closed_form(**ref, softplus=True)[0].sum().backward()
    for k in a:
        torch.testing.assert_close(leaves[k].grad, ref[k].grad, rtol=1e-11, atol=1e-11, msg=k)


def test_dt_limit_clamps_after_softplus():
    a = make(b=1, l=9, h=2, p=2, g=1, n=3)
    out = ssd_scan(**a, dt_softplus=True, dt_limit=(0.2, 0.5), impl="chunked")
    step = F.softplus(a["dt"] + a["dt_bias"]).clamp(0.2, 0.5)
    ref = ssd_scan_naive(a["x"], step, a["A"], a["B"], a["C"], a["D"], a["z"])[0]
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out, ssd_scan(**a, dt_softplus=True, impl="chunked"))


def test_result_does_not_depend_on_chunk_size():
    a = make(b=1, l=50, h=2, p=3, g=1, n=4)
    outs = [ssd_scan(**a, dt_softplus=True, chunk_size=cs) for cs in (1, 7, 16, 50, 256)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-11, atol=1e-11)


def test_float32_chunked_close_to_float64_oracle():
    a = make(b=2, l=300, h=4, p=8, g=1, n=16)
    ref = ssd_scan(**a, dt_softplus=True, impl="naive")
    out = ssd_scan(**{k: v.float() for k, v in a.items()}, dt_softplus=True, chunk_size=64)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("impl", ["naive", "chunked", "selective"])
@pytest.mark.parametrize("reverse", [False, True])
def test_packed_sequences_equal_separate_calls(impl, reverse):
    lens = [5, 1, 12, 0, 9]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
    a = make(b=1, l=sum(lens), h=4, p=3, g=2, n=5)
    h0 = torch.randn(len(lens), 4, 3, 5, dtype=F64)
    out, last = ssd_scan(**a, dt_softplus=True, cu_seqlens=cu, initial_state=h0, reverse=reverse,
                         return_final_state=True, impl=impl, chunk_size=4)
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        part = {k: (v[:, s:e] if v.dim() >= 3 else v) for k, v in a.items()}
        ref, ref_last = ssd_scan(**part, dt_softplus=True, initial_state=h0[i:i + 1], reverse=reverse,
                                 return_final_state=True, impl="naive")
        torch.testing.assert_close(out[:, s:e], ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(last[i:i + 1], ref_last, rtol=1e-10, atol=1e-10)


def test_length_zero():
    a = make(b=2, l=0, h=2, p=3, g=1, n=4)
    h0 = torch.randn(2, 2, 3, 4, dtype=F64)
    for impl in ("naive", "chunked", "selective"):
        out, last = ssd_scan(**a, initial_state=h0, return_final_state=True, impl=impl)
        assert out.shape == (2, 0, 2, 3)
        torch.testing.assert_close(last, h0)


def test_step_by_step_decoding_equals_the_scan():
    a = make(b=2, l=10, h=4, p=3, g=2, n=5, D_per_channel=True)
    kw = dict(dt_bias=a["dt_bias"], dt_softplus=True, dt_limit=(0.0, 2.0))
    prompt = 6
    ref, ref_last = ssd_scan(a["x"], a["dt"], a["A"], a["B"], a["C"], a["D"], a["z"], **kw, return_final_state=True)
    _, state = ssd_scan(*(a[k][:, :prompt] for k in ("x", "dt")), a["A"], *(a[k][:, :prompt] for k in ("B", "C")),
                        a["D"], a["z"][:, :prompt], **kw, return_final_state=True)
    for t in range(prompt, 10):
        y, state = ssd_step(state, a["x"][:, t], a["dt"][:, t], a["A"], a["B"][:, t], a["C"][:, t], a["D"], a["z"][:, t], **kw)
        torch.testing.assert_close(y, ref[:, t], rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(state, ref_last, rtol=1e-11, atol=1e-11)


def test_chunked_path_is_the_cpu_default_without_numba(monkeypatch):
    # with numba (the 'cpu' extra) the default is the fused scan: tests/test_ssd_cpu.py
    from zoo.core.selective_scan import cpu_fused

    monkeypatch.setattr(cpu_fused, "numba", None)
    a = make(b=1, l=9, h=2, p=2, g=1, n=3)
    direct = ssd_scan_chunked(a["x"], a["dt"] + a["dt_bias"], a["A"], a["B"], a["C"], a["D"], a["z"])[0]
    torch.testing.assert_close(ssd_scan(**a), direct, rtol=0, atol=0)


def test_bad_input_errors():
    a = make(b=2, l=6, h=4, p=3, g=2, n=5)
    with pytest.raises(ValueError, match=r"x must be \(batch, length, nheads, headdim\), got shape \(2, 6, 12\)"):
        ssd_scan(**{**a, "x": a["x"].reshape(2, 6, 12)})
    with pytest.raises(ValueError, match=r"ngroups=3 \(B's third axis\) must divide nheads=4"):
        ssd_scan(**{**a, "B": torch.randn(2, 6, 3, 5, dtype=F64), "C": torch.randn(2, 6, 3, 5, dtype=F64)})
    with pytest.raises(ValueError, match=r"A must be \(nheads=4,\)"):
        ssd_scan(**{**a, "A": torch.randn(4, 5, dtype=F64)})
    with pytest.raises(ValueError, match=r"D must be \(4,\) or \(4, 3\), got shape \(12,\)"):
        ssd_scan(**{**a, "D": torch.randn(12, dtype=F64)})
    with pytest.raises(ValueError, match=r"dt must be \(batch=2, length=6, nheads=4\)"):
        ssd_scan(**{**a, "dt": a["dt"][..., :3]})
    with pytest.raises(ValueError, match="packed sequences .* need batch 1"):
        ssd_scan(**a, cu_seqlens=torch.tensor([0, 6]))
    one = {k: (v[:1] if v.dim() >= 3 else v) for k, v in a.items()}
    with pytest.raises(ValueError, match=r"cu_seqlens must start at 0, be non-decreasing and end at length 6, got \[0, 4, 2, 6\]"):
        ssd_scan(**one, cu_seqlens=torch.tensor([0, 4, 2, 6]))
    with pytest.raises(ValueError, match=r"initial_state must be \(2, 4, 3, 5\)"):
        ssd_scan(**one, cu_seqlens=torch.tensor([0, 2, 6]), initial_state=torch.zeros(1, 4, 3, 5, dtype=F64))
    with pytest.raises(ValueError, match=r"dt_limit must be \(low, high\) with 0 <= low <= high, got \(0.5, 0.1\)"):
        ssd_scan(**a, dt_limit=(0.5, 0.1))
    with pytest.raises(ValueError, match="impl must be one of"):
        ssd_scan(**a, impl="fast")
    with pytest.raises(TypeError, match="x must be a floating tensor, got torch.int64"):
        ssd_scan(**{**a, "x": a["x"].long()})


# ---------------------------------------------------------------- negative eigenvalues


def signed_closed_form(x, dt, A, B, C, h0=None):
    """The scan with transitions a_t = 2 exp(dt_t A) - 1 written as explicit products (no recurrence)."""
    b, l, h, p = x.shape
    rep = h // B.shape[2]
    Bh, Ch = B.repeat_interleave(rep, dim=2), C.repeat_interleave(rep, dim=2)
    a = 2 * torch.exp(dt * A) - 1  # (b, l, h)
    y = torch.zeros(b, l, h, p, dtype=F64)
    for t in range(l):
        S = torch.zeros(b, h, p, B.shape[-1], dtype=F64)
        for s in range(t + 1):
            prod = torch.prod(a[:, s + 1:t + 1], dim=1) if s < t else torch.ones(b, h, dtype=F64)
            S = S + (prod * dt[:, s])[..., None, None] * x[:, s, :, :, None] * Bh[:, s, :, None, :]
        if h0 is not None:
            S = S + torch.prod(a[:, : t + 1], dim=1)[..., None, None] * h0
        y[:, t] = (S * Ch[:, t, :, None, :]).sum(-1)
    return y


def _signed_inputs(l=23):
    a = make(b=2, l=l, h=4, p=3, g=2, n=5)
    a["A"] = -torch.tensor([0.3, 1.0, 3.0, 8.0], dtype=F64)  # transitions of both signs
    a["dt"] = a["dt"].abs() + 0.05
    del a["dt_bias"]
    return a


def test_negative_eigenvalues_oracle_matches_explicit_products():
    a = _signed_inputs(l=9)
    h0 = torch.randn(2, 4, 3, 5, dtype=F64)
    out = ssd_scan(a["x"], a["dt"], a["A"], a["B"], a["C"], initial_state=h0, impl="naive", negative_eigenvalues=True)
    ref = signed_closed_form(a["x"], a["dt"], a["A"], a["B"], a["C"], h0)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    trans = 2 * torch.exp(a["dt"] * a["A"]) - 1
    assert (trans < 0).any() and (trans > 0).any()


@pytest.mark.parametrize("impl", ["chunked", "selective"])
@pytest.mark.parametrize("reverse", [False, True])
def test_negative_eigenvalues_paths_match_the_oracle_with_gradients(impl, reverse):
    a = _signed_inputs()
    h0 = torch.randn(2, 4, 3, 5, dtype=F64)
    results = {}
    for path in (impl, "naive"):
        leaves = {k: v.clone().requires_grad_() for k, v in {**a, "h0": h0}.items()}
        args = {k: v for k, v in leaves.items() if k != "h0"}
        out, last = ssd_scan(**args, initial_state=leaves["h0"], reverse=reverse, return_final_state=True, impl=path,
                             chunk_size=5, negative_eigenvalues=True)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
        torch.autograd.backward((out, last), (g, torch.ones_like(last)))
        results[path] = (out.detach(), last.detach(), {k: v.grad for k, v in leaves.items()})
    torch.testing.assert_close(results[impl][0], results["naive"][0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(results[impl][1], results["naive"][1], rtol=1e-10, atol=1e-10)
    for k, ref in results["naive"][2].items():
        torch.testing.assert_close(results[impl][2][k], ref, rtol=1e-9, atol=1e-9, msg=k)


def test_negative_eigenvalues_let_one_state_track_parity():
    # Bit 1 -> dt large (transition ~ -1), bit 0 -> dt ~ 0 (transition ~ +1): the state's sign after the
    # prefix is (-1)^(number of ones), which no transition in (0, 1) can produce.
    bits = torch.randint(0, 2, (8, 300), generator=torch.Generator().manual_seed(0))
    dt = (bits * 40.0 + 1e-6).to(F64)[..., None]  # (b, l, 1)
    x, B = torch.zeros(8, 300, 1, 1, dtype=F64), torch.zeros(8, 300, 1, 1, dtype=F64)
    C = torch.ones(8, 300, 1, 1, dtype=F64)
    h0 = torch.ones(8, 1, 1, 1, dtype=F64)
    parity = 1 - 2 * (bits.cumsum(1) % 2)
    for impl in ("naive", "chunked", "selective"):
        y = ssd_scan(x, dt, -torch.ones(1, dtype=F64), B, C, initial_state=h0, impl=impl, negative_eigenvalues=True)
        assert torch.equal(torch.sign(y[..., 0, 0]).long(), parity), impl
        plain = ssd_scan(x, dt, -torch.ones(1, dtype=F64), B, C, initial_state=h0, impl=impl)
        assert (plain >= 0).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the GPU paths of the op")
@pytest.mark.parametrize("negative_eigenvalues", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_paths_match_the_float64_oracle(negative_eigenvalues, dtype):
    a = _signed_inputs(l=70) if negative_eigenvalues else make(b=2, l=70, h=4, p=8, g=2, n=16)
    h0 = torch.randn(2, 4, a["x"].shape[-1], a["B"].shape[-1], dtype=F64)
    kw = dict(initial_state=h0, return_final_state=True, negative_eigenvalues=negative_eigenvalues,
              dt_softplus=not negative_eigenvalues)
    ref, ref_last = ssd_scan(**a, **kw, impl="naive")
    cuda = {k: (v.to("cuda", dtype) if k in ("x", "B", "C", "z") else v.cuda().float()) for k, v in a.items()}
    out, last = ssd_scan(**cuda, **{**kw, "initial_state": h0.float().cuda()})
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-4
    scale = ref.abs().max().item()
    assert (out.double().cpu() - ref).abs().max().item() <= tol * max(scale, 1.0)
    assert (last.double().cpu() - ref_last).abs().max().item() <= tol * max(ref_last.abs().max().item(), 1.0)
