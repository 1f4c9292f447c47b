"""The core op's PyTorch paths against an independent closed-form oracle and against each other."""
import pytest
import torch
import torch.nn.functional as F

from zoo.core.selective_scan import selective_scan, selective_scan_chunked, selective_scan_fn, selective_scan_naive


def closed_form(u, delta, A, B, C, D=None, z=None, delta_bias=None, softplus=False, reverse=False, h0=None):
    """O(L^2) float64 statement of the scan, independent of the recurrence code:
    h_t = P(t, start) h0 + sum_{s in past(t)} P(t, s) dt_s B_s u_s with P the product of exp(dt A)
    over the steps after s up to t."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.double()
    if softplus:
        delta = F.softplus(delta)
    b, l, d = u.shape
    g = 1 if B.dim() == 3 else B.shape[2]
    Bd = (B.unsqueeze(2) if B.dim() == 3 else B).repeat_interleave(d // g, dim=2)
    Cd = (C.unsqueeze(2) if C.dim() == 3 else C).repeat_interleave(d // g, dim=2)
    logdA = delta[..., None] * A  # (b, l, d, n)
    order = list(range(l))[::-1] if reverse else list(range(l))
    y = torch.zeros(b, l, d, dtype=torch.float64)
    h_last = None
    for i, t in enumerate(order):
        past = order[: i + 1]
        h = torch.zeros(b, d, A.shape[1], dtype=torch.float64)
        for s in past:
            later = [r for r in past if order.index(r) > order.index(s)]
            decay = torch.exp(sum((logdA[:, r] for r in later), torch.zeros_like(h)))
            h = h + decay * delta[:, s, :, None] * Bd[:, s] * u[:, s, :, None]
        if h0 is not None:
            h = h + torch.exp(sum((logdA[:, r] for r in past), torch.zeros_like(h))) * h0.double()
        y[:, t] = (h * Cd[:, t]).sum(-1)
        h_last = h
    if D is not None:
        y = y + u * D.double()
    if z is not None:
        y = y * F.silu(z.double())
    return y, h_last


def make(b, l, d, n, groups=None, dtype=torch.float32, seed=None, requires_grad=False):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    bc = (b, l, n) if groups is None else (b, l, groups, n)
    t = dict(
        u=r(b, l, d), delta=r(b, l, d) * 0.5, A=-torch.rand(d, n, generator=g, dtype=dtype) - 0.2,
        B=r(*bc), C=r(*bc), D=r(d), z=r(b, l, d), delta_bias=r(d) * 0.3, initial_state=r(b, d, n),
    )
    if requires_grad:
        for v in t.values():
            v.requires_grad_(True)
    return t


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("groups", [None, 3])
def test_naive_matches_closed_form(reverse, groups):
    t = make(2, 7, 6, 3, groups=groups, dtype=torch.float64)
    out, last = selective_scan_naive(
        t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"], True, True, reverse, t["initial_state"]
    )
    ref, ref_last = closed_form(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"], True, reverse, t["initial_state"])
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(last, ref_last, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "shape, groups",
    [((1, 1, 1, 1), None), ((1, 1, 2, 1), 2), ((2, 37, 10, 5), None), ((2, 37, 10, 5), 5), ((3, 129, 12, 16), 4),
     ((1, 300, 8, 4), None)],
)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("num_chunks", [None, 1, 5])
def test_chunked_matches_naive(shape, groups, reverse, num_chunks):
    b, l, d, n = shape
    t = make(b, l, d, n, groups=groups)
    args = (t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"], True, True, reverse, t["initial_state"])
    out, last = selective_scan_naive(*args)
    out_c, last_c = selective_scan_chunked(*args, num_chunks=num_chunks)
    torch.testing.assert_close(out_c, out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(last_c, last, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["naive", "chunked"])
@pytest.mark.parametrize("reverse", [False, True])
def test_gradcheck(impl, reverse):
    t = make(2, 9, 4, 3, groups=2, dtype=torch.float64, requires_grad=True)
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]
    extra = {"num_chunks": 3} if impl == "chunked" else {}
    fn = selective_scan_chunked if impl == "chunked" else selective_scan_naive

    def f(*xs):
        kw = dict(zip(names, xs))
        out, last = fn(kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"], kw["z"], kw["delta_bias"], True, True,
                       reverse, kw["initial_state"], **extra)
        return out, last

    assert torch.autograd.gradcheck(f, tuple(t[k] for k in names))


def test_chunked_gradients_match_naive_float32():
    t1 = make(2, 50, 6, 4, requires_grad=True, seed=3)
    t2 = {k: v.detach().clone().requires_grad_(True) for k, v in t1.items()}
    g = torch.randn(2, 50, 6)
    for t, fn, kw in ((t1, selective_scan_naive, {}), (t2, selective_scan_chunked, {"num_chunks": 7})):
        out = fn(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"], True, False, False, t["initial_state"], **kw)
        (out * g).sum().backward()
    for k in t1:
        torch.testing.assert_close(t2[k].grad, t1[k].grad, rtol=1e-4, atol=1e-4, msg=lambda m: f"grad of {k}: {m}")


def test_bf16_input_keeps_float32_state():
    t = make(2, 64, 8, 4, seed=1)
    low = {k: v.bfloat16() for k, v in t.items() if k not in ("A", "D", "delta_bias", "initial_state")}
    out = selective_scan(low["u"], low["delta"], t["A"], low["B"], low["C"], t["D"], low["z"], t["delta_bias"], True)
    assert out.dtype == torch.bfloat16
    # The reference on the same bf16-rounded inputs, in float64: only the output rounding differs.
    ref = selective_scan_naive(*(x.double() for x in (low["u"], low["delta"], t["A"], low["B"], low["C"], t["D"], low["z"], t["delta_bias"])), True)
    torch.testing.assert_close(out.double(), ref, rtol=1.6e-2, atol=1e-2)
    assert (out.double() - ref).abs().max() <= 2 * ref.abs().max() * 2**-8


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_cu_seqlens_equals_separate_sequences(reverse, impl):
    lens = [5, 1, 12, 7]
    d, n = 6, 4
    parts = [make(1, l, d, n, seed=i) for i, l in enumerate(lens)]
    cat = {k: torch.cat([p[k] for p in parts], dim=1) for k in ("u", "delta", "B", "C", "z")}
    A, D, db = parts[0]["A"], parts[0]["D"], parts[0]["delta_bias"]
    h0 = torch.cat([p["initial_state"] for p in parts])
    cu = torch.tensor([0, 5, 6, 18, 25], dtype=torch.int32)
    out, last = selective_scan(cat["u"], cat["delta"], A, cat["B"], cat["C"], D, cat["z"], db, True, True,
                               reverse=reverse, initial_state=h0, cu_seqlens=cu, impl=impl)
    for i, p in enumerate(parts):
        o, h = selective_scan_naive(p["u"], p["delta"], A, p["B"], p["C"], D, p["z"], db, True, True, reverse, h0[i : i + 1])
        torch.testing.assert_close(out[:, cu[i] : cu[i + 1]], o, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(last[i : i + 1], h, rtol=1e-5, atol=1e-5)


def test_mamba_layout_wrapper():
    t = make(2, 11, 6, 4, seed=5)
    tr = lambda x: x.transpose(1, 2)  # noqa: E731
    out, last = selective_scan_fn(tr(t["u"]), tr(t["delta"]), t["A"], tr(t["B"]), tr(t["C"]), t["D"], tr(t["z"]),
                                  t["delta_bias"], True, True)
    ref, ref_last = selective_scan_naive(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"], True, True)
    torch.testing.assert_close(out, tr(ref), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, ref_last)
    # grouped B/C in mamba-ssm's (batch, groups, d_state, length) layout
    Bg, Cg = torch.randn(2, 11, 3, 4), torch.randn(2, 11, 3, 4)
    out = selective_scan_fn(tr(t["u"]), tr(t["delta"]), t["A"], Bg.permute(0, 2, 3, 1), Cg.permute(0, 2, 3, 1))
    torch.testing.assert_close(out, tr(selective_scan_naive(t["u"], t["delta"], t["A"], Bg, Cg)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(u=torch.randn(2, 5)), r"u must be \(batch, length, dim\), got shape \(2, 5\)"),
        (dict(delta=torch.randn(2, 5, 7)), r"delta must have u's shape \(2, 5, 6\), got \(2, 5, 7\)"),
        (dict(A=torch.randn(5, 4)), r"A must be \(dim=6, d_state\), got shape \(5, 4\)"),
        (dict(B=torch.randn(2, 5, 3)), r"B must be \(batch=2, length=5, d_state=4\)"),
        (dict(C=torch.randn(2, 5, 4, 4)), r"groups dividing dim=6, got shape \(2, 5, 4, 4\)"),
        (dict(D=torch.randn(5)), r"D must be \(6,\), got shape \(5,\)"),
        (dict(initial_state=torch.randn(2, 6, 3)), r"initial_state must be \(2, 6, 4\), got shape \(2, 6, 3\)"),
        (dict(u=torch.randint(0, 3, (2, 5, 6)), delta=torch.randint(0, 3, (2, 5, 6))), r"u must be a floating tensor"),
    ],
)
def test_bad_arguments_say_what_was_expected(change, match):
    t = make(2, 5, 6, 4, seed=0)
    t.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        selective_scan(t["u"], t["delta"], t["A"], t["B"], t["C"], D=t["D"], initial_state=t["initial_state"])


def test_bad_cu_seqlens():
    t = make(1, 10, 4, 2, seed=0)
    with pytest.raises(ValueError, match=r"end at length 10, got \[0, 4, 9\]"):
        selective_scan(t["u"], t["delta"], t["A"], t["B"], t["C"], cu_seqlens=torch.tensor([0, 4, 9]))
    with pytest.raises(ValueError, match="unknown|impl must be one of"):
        selective_scan(t["u"], t["delta"], t["A"], t["B"], t["C"], impl="cuda-magic")


@pytest.mark.parametrize("num_chunks", [1, 3, 7])
@pytest.mark.parametrize("reverse", [False, True])
def test_negative_eigenvalues_chunked_matches_naive_with_gradients(num_chunks, reverse):
    g = torch.Generator().manual_seed(0)
    b, l, d, n = 2, 21, 6, 4
    inputs = dict(u=torch.randn(b, l, d, generator=g, dtype=torch.float64),
                  delta=torch.rand(b, l, d, generator=g, dtype=torch.float64) * 2,
                  A=-torch.rand(d, n, generator=g, dtype=torch.float64) * 4,
                  B=torch.randn(b, l, n, generator=g, dtype=torch.float64),
                  C=torch.randn(b, l, n, generator=g, dtype=torch.float64),
                  h0=torch.randn(b, d, n, generator=g, dtype=torch.float64))
    assert (2 * torch.exp(inputs["delta"][..., None] * inputs["A"]) - 1 < 0).any()
    grads = []
    for fn in (lambda **k: selective_scan_chunked(**k, num_chunks=num_chunks), selective_scan_naive):
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        out, last = fn(u=leaves["u"], delta=leaves["delta"], A=leaves["A"], B=leaves["B"], C=leaves["C"],
                       initial_state=leaves["h0"], reverse=reverse, return_last_state=True, negative_eigenvalues=True)
        (out.square().sum() + last.sum()).backward()
        grads.append((out.detach(), last.detach(), {k: v.grad for k, v in leaves.items()}))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-11, atol=1e-11)
    for k in inputs:
        torch.testing.assert_close(grads[0][2][k], grads[1][2][k], rtol=1e-10, atol=1e-10, msg=k)


def test_negative_eigenvalues_oracle_is_the_signed_recurrence():
    g = torch.Generator().manual_seed(1)
    u, delta = torch.randn(1, 5, 2, generator=g, dtype=torch.float64), torch.rand(1, 5, 2, generator=g, dtype=torch.float64)
    A, B, C = -torch.rand(2, 3, generator=g, dtype=torch.float64) * 3, torch.randn(1, 5, 3, generator=g, dtype=torch.float64), torch.randn(1, 5, 3, generator=g, dtype=torch.float64)
    out = selective_scan(u, delta, A, B, C, negative_eigenvalues=True)
    h = torch.zeros(1, 2, 3, dtype=torch.float64)
    for t in range(5):
        h = (2 * torch.exp(delta[:, t, :, None] * A) - 1) * h + delta[:, t, :, None] * B[:, t, None, :] * u[:, t, :, None]
        torch.testing.assert_close(out[:, t], (h * C[:, t, None, :]).sum(-1), rtol=1e-12, atol=1e-12)
    # The Triton kernels take the option too (they raised NotImplementedError before their SIGNED
    # variant; tests/test_kernels_negative_eigenvalues.py checks them fully): float32, in the
    # interpreter without a GPU.
    pytest.importorskip("triton")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out32 = selective_scan(*(t.float().to(dev) for t in (u, delta, A, B, C)), negative_eigenvalues=True, impl="triton")
    torch.testing.assert_close(out32.double().cpu(), out, rtol=1e-5, atol=1e-5)
