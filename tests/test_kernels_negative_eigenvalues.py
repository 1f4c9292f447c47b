"""Triton selective-scan kernels with negative eigenvalues (transitions 2 exp(dt A) - 1 in (-1, 1),
Grazzi et al.) against the sequential float64 oracle: values and every gradient, for each feature of
the kernels (both directions, groups, optional inputs, initial/final state, packed sequences,
several directions in one launch, the segmented long-sequence path).

Inputs are drawn so that a good share of the transitions is negative (each test checks that some
are, and some positive), so a kernel that ignored the sign, or took exp(dt A)'s derivative or the
segment decay exp(A sum dt), fails. Without a GPU the kernels run in Triton's interpreter on CPU
(float32 inputs, float32 state, against float64: tolerances as in test_kernels.py).
"""
import pytest
import torch
import torch.nn.functional as F

# conftest.py sets TRITON_INTERPRET=1 when there is no GPU, before any module imports the kernels.
pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

from zoo.core.selective_scan import selective_scan, selective_scan_multi, selective_scan_naive  # noqa: E402
from zoo.kernels.selective_scan import selective_scan_multi_triton, selective_scan_triton  # noqa: E402
from test_kernels import compare as _compare, packed_reference, rel  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-5


def compare(fn, ref_fn, t, tol=TOL, seed=0):
    """test_kernels.compare at this file's tolerance unless another is given."""
    return _compare(fn, ref_fn, t, tol, seed)


def make(b, l, d, n, groups=None, k=None, seed=0):
    """Random inputs whose steps dt in about (0.3, 1.4) (softplus of delta in (-1, 1) plus the bias; without
    softplus the tests shift delta to (0, 2)) meet A in (-2.1, -0.1), so that dt A falls on both sides of
    -log 2: transitions of both signs, about half of them negative."""
    g = torch.Generator().manual_seed(seed)
    lead = () if k is None else (k,)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(DEV)

    bc = (*lead, b, l, n) if groups is None else (*lead, b, l, groups, n)
    return dict(
        u=r(*lead, b, l, d), delta=(torch.rand(*lead, b, l, d, generator=g) * 2 - 1).to(DEV),
        A=(-torch.rand(*lead, d, n, generator=g) * 2 - 0.1).to(DEV), B=r(*bc), C=r(*bc),
        D=r(*lead, d), z=r(*lead, b, l, d), delta_bias=r(*lead, d, scale=0.3),
    )


def assert_mixed_signs(t, softplus):
    """The transitions these inputs give: some negative (else the test could not fail) and some positive."""
    dt = t["delta"].double()
    if t.get("delta_bias") is not None:
        dt = dt + t["delta_bias"].double()[..., None, None, :]
    if softplus:
        dt = F.softplus(dt)
    A = t["A"].double()
    A = A[:, None, None] if A.dim() == 3 else A  # (K, d, n) -> broadcast over (K, b, l, d, n)
    a = 2 * torch.exp(dt[..., None] * A) - 1
    frac = (a < 0).double().mean().item()
    assert 0.05 < frac < 0.95, f"fraction of negative transitions {frac:.3f}"


CASES = [
    # b, l, d, n, groups, reverse, with h0, optional inputs (D, z, delta_bias, softplus) on
    (2, 37, 11, 5, None, False, True, True),
    (2, 29, 12, 3, 3, True, True, True),
    (1, 19, 6, 1, None, True, False, False),
]


@pytest.mark.parametrize("b,l,d,n,groups,reverse,h0,full", CASES)
def test_signed_scan_matches_oracle(b, l, d, n, groups, reverse, h0, full):
    t = make(b, l, d, n, groups=groups, seed=l + d + n)
    if not full:
        t.update(D=None, z=None, delta_bias=None, delta=t["delta"] + 1)  # no softplus: dt = delta in (0, 2)
    t["initial_state"] = torch.randn(b, d, n).to(DEV) if h0 else None
    assert_mixed_signs(t, full)
    kw = dict(delta_softplus=full, return_last_state=True, reverse=reverse)
    ref = compare(lambda **x: selective_scan_triton(**x, **kw, negative_eigenvalues=True),
                  lambda **x: selective_scan_naive(**x, **kw, negative_eigenvalues=True), t)
    # The scan with positive transitions is far from it on these inputs: the option matters here.
    assert rel(selective_scan_naive(**{k: v.double() for k, v in t.items() if v is not None}, **kw)[0], ref) > 0.05


def near_unit(t, seed):
    """Transitions near +1 or -1 at random (dt about 0.01 or 1.5 against A in (-5, -4)), so that a
    segment's product of transitions (about 0.95^36 over 36 steps) is far from 0 and its sign is
    random per channel and state: the chaining of segments then shows in the results."""
    g = torch.Generator().manual_seed(seed)
    big = torch.rand(t["delta"].shape, generator=g) < 0.5
    t["delta"] = (torch.where(big, 1.3, -4.6) + 0.05 * torch.randn(t["delta"].shape, generator=g)).to(DEV)
    t["delta_bias"] = (0.05 * torch.randn(t["delta_bias"].shape, generator=g)).to(DEV)
    t["A"] = (-4 - torch.rand(t["A"].shape, generator=g)).to(DEV)
    return t


@pytest.mark.parametrize("reverse", [False, True])
def test_signed_segmented_long_sequence_path(monkeypatch, reverse):
    """Few programs: the sequence is cut into 3 segments (9 chunks of 4 steps, the last partial)
    scanned in parallel and chained by each segment's product of signed transitions, forward
    (states) and backward (adjoints), with an initial state."""
    from zoo.kernels.selective_scan import function

    monkeypatch.setattr(function, "_SEGMENT_BELOW", 1 << 20)
    assert function._segments(1, 101, 4, False) == (3, 36)
    t = near_unit(make(1, 101, 3, 4, seed=12 + reverse), seed=int(reverse))
    t["initial_state"] = torch.randn(1, 3, 4).to(DEV)
    assert_mixed_signs(t, True)
    # Segment products: far from 0, of both signs (else chaining them could be wrong unseen).
    dt = F.softplus(t["delta"].double() + t["delta_bias"].double())[0, :72, :, None]
    prods = (2 * torch.exp(dt * t["A"].double()) - 1).view(2, 36, 3, 4).prod(1)
    assert (prods > 0.02).any() and (prods < -0.02).any()
    kw = dict(delta_softplus=True, return_last_state=True, reverse=reverse, negative_eigenvalues=True)
    compare(lambda **x: selective_scan_triton(**x, block_t=4, **kw), lambda **x: selective_scan_naive(**x, **kw), t)


def test_signed_packed_sequences_match_separate_calls():
    """Packed sequences (one of length 1, one empty), reversed, grouped B/C, per-sequence initial states."""
    cu = [0, 1, 14, 14, 30]
    t = make(1, 30, 8, 4, groups=2, seed=6)
    t["initial_state"] = torch.randn(4, 8, 4).to(DEV)
    assert_mixed_signs(t, True)
    cu_t = torch.tensor(cu, dtype=torch.int32, device=DEV)
    kw = dict(delta_softplus=True, return_last_state=True, reverse=True, negative_eigenvalues=True)

    ref = packed_reference(cu, kw)

    compare(lambda **x: selective_scan_triton(**x, cu_seqlens=cu_t, **kw), ref, t)


def test_signed_multi_direction_one_launch():
    """VMamba's four cross-scan directions over a 3 x 5 image, u and z shared, initial states."""
    dirs = ("forward", "reverse", "forward_t", "reverse_t")
    t = make(2, 15, 6, 4, k=4, seed=7)
    t["u"], t["z"] = t["u"][0], t["z"][0]
    t["initial_state"] = torch.randn(4, 2, 6, 4).to(DEV)
    assert_mixed_signs(t, True)
    kw = dict(delta_softplus=True, return_last_state=True, directions=dirs, hw=(3, 5), negative_eigenvalues=True)
    compare(lambda **x: selective_scan_multi_triton(**x, **kw),
            lambda **x: selective_scan_multi(**x, **kw, impl="naive"), t)


def test_signed_multi_direction_packed_through_the_core_op():
    """Vim's pair over packed sequences (one empty) through the core op with impl='triton' (before
    the kernels took the option, this raised NotImplementedError)."""
    t = make(1, 25, 6, 4, k=2, seed=21)
    t["initial_state"] = torch.randn(2, 3, 6, 4).to(DEV)
    assert_mixed_signs(t, True)
    cu = torch.tensor([0, 7, 7, 25], device=DEV)
    kw = dict(delta_softplus=True, return_last_state=True, directions=("forward", "reverse"), cu_seqlens=cu,
              negative_eigenvalues=True)
    compare(lambda **x: selective_scan_multi(**x, **kw, impl="triton"),
            lambda **x: selective_scan_multi(**x, **kw, impl="naive"), t)


def test_core_op_takes_negative_eigenvalues_on_the_kernels(monkeypatch):
    """selective_scan(impl='triton', negative_eigenvalues=True) runs the kernels (no longer
    NotImplementedError), and 'auto' picks them too wherever it picks them without the option."""
    from zoo.core.selective_scan import op

    t = make(1, 17, 4, 3, seed=9)
    assert_mixed_signs(t, True)
    ref = selective_scan(**t, delta_softplus=True, impl="naive", negative_eigenvalues=True)
    out = selective_scan(**t, delta_softplus=True, impl="triton", negative_eigenvalues=True)
    assert rel(out, ref) < TOL
    assert op._resolve("auto", torch.device("cuda"), True) is op._resolve("auto", torch.device("cuda"), False)
    assert op._resolve("triton", torch.device("cpu"), True) is selective_scan_triton


def test_signed_custom_op_registration_and_compile():
    """The custom op with negative_eigenvalues=True passes torch.library's checks (schema, fake tensors,
    autograd registration), and torch.compile(fullgraph=True) keeps the option on the op."""
    from zoo.kernels.selective_scan.function import _scan_fwd

    t = make(1, 9, 4, 2, seed=10)
    args = (t["u"][None], t["delta"][None], t["A"][None], t["B"][None, :, :, None], t["C"][None, :, :, None],
            t["D"][None], t["z"][None], t["delta_bias"][None], None,
            torch.zeros(1, dtype=torch.int32, device=DEV), None, 1, 1, True, True, 8, 0)
    for a in args[:8]:
        a.requires_grad_(True)
    torch.library.opcheck(_scan_fwd, args, {"negative_eigenvalues": True},
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(u, delta, A, B, C):
        return selective_scan_triton(u, delta, A, B, C, delta_softplus=True, negative_eigenvalues=True) * 2

    ins = {k: t[k].detach().clone().requires_grad_(True) for k in ("u", "delta", "A", "B", "C")}
    out = f(**ins)
    ref = selective_scan_naive(**{k: v.detach().double() for k, v in ins.items()}, delta_softplus=True,
                               negative_eigenvalues=True) * 2
    assert rel(out, ref) < TOL
    out.sum().backward()
    assert all(torch.isfinite(v.grad).all() for v in ins.values())


def long_sequence_check(dev, L, tol):
    """Both directions over one long sequence with the launcher's own tiles and segment counts (few
    programs: the sequence is cut into many segments), transitions near +-1 so the chaining matters,
    against the float64 chunked path (itself checked against the oracle in test_selective_scan)."""
    from zoo.core.selective_scan import selective_scan_chunked
    from zoo.kernels.selective_scan import function

    t = near_unit(make(1, L, 32, 16, seed=31), seed=31)
    t = {k: v.to(dev) for k, v in t.items()}
    t["initial_state"] = torch.randn(1, 32, 16).to(dev)
    dpg_blocks = 32 // function._config(16, 32, False)[1]
    assert function._segments(dpg_blocks, L, function._config(16, 32, False)[0], False)[0] > 4
    for reverse in (False, True):
        kw = dict(delta_softplus=True, return_last_state=True, reverse=reverse, negative_eigenvalues=True)
        compare(lambda **x: selective_scan_triton(**x, **kw), lambda **x: selective_scan_chunked(**x, **kw), t, tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the compiled kernels' own tile sizes at length 4096")
def test_signed_long_sequence_cuda_compiled_tiles():
    long_sequence_check("cuda", 4096, 1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the mixer dispatches to the kernels only for CUDA tensors")
def test_signed_bimamba_mixer_cuda_matches_cpu_float64():
    """BiMamba with negative eigenvalues on CUDA (dispatch picks the kernels) against the same weights on
    the CPU path in float64: output and every parameter gradient."""
    from zoo.core import BiMamba

    torch.manual_seed(0)
    ref = BiMamba(40, d_state=12, divide_out=True, negative_eigenvalues=True).double()
    with torch.no_grad():  # steps near 0.7 against A in (-2.5, -0.3): transitions of both signs
        for name in ("A_log", "A_b_log"):
            getattr(ref, name).copy_(torch.log(0.3 + 2.2 * torch.rand(ref.A_log.shape, dtype=torch.float64)))
        ref.dt_proj.bias.fill_(0.0)
        ref.dt_proj_b.bias.fill_(0.0)
    fast = BiMamba(40, d_state=12, divide_out=True, negative_eigenvalues=True).cuda()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(3, 77, 40, dtype=torch.float64)
    y_ref = ref(x)
    y_ref.square().sum().backward()
    y = fast(x.float().cuda())
    y.square().sum().backward()
    assert rel(y.cpu(), y_ref) < 1e-5
    grads = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        assert rel(p.grad.cpu(), grads[name].grad) < 1e-4, name
