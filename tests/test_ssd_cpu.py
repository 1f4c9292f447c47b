"""The fused CPU SSD scan (numba, ssd_scan impl="cpu") against the float64 sequential oracle: values, final
states and every gradient, both directions, groups, heads narrower and wider than a channel block, packed
sequences, initial/final state, negative eigenvalues, dt limits; dispatch and its fallbacks."""
import pytest
import torch

from zoo.core.selective_scan import cpu_fused as m1_fused
from zoo.core.ssd import cpu_fused, op, ssd_scan
from zoo.core.ssd.cpu_fused import ssd_scan_cpu

pytestmark = pytest.mark.skipif(not cpu_fused.available(), reason="numba is not installed (the 'cpu' extra)")

F64 = torch.float64


def make(b, l, h, p, g, n, seed=0, D_per_channel=False):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    return dict(x=r(b, l, h, p), dt=r(b, l, h), A=-torch.rand(h, generator=gen, dtype=F64).mul(2).add(0.1),
                B=r(b, l, g, n), C=r(b, l, g, n), D=r(h, p) if D_per_channel else r(h), z=r(b, l, h, p),
                dt_bias=r(h), initial_state=r(b, h, p, n))


def run(t, impl, dtype, **kw):
    """Output, final state and the gradients of <out, g_out> + <last, g_last> w.r.t. every input tensor."""
    leaves = {k: v.to(dtype).requires_grad_() for k, v in t.items()}
    out, last = ssd_scan(**leaves, return_final_state=True, impl=impl, **kw)
    gen = torch.Generator().manual_seed(1)  # the same cotangents for both paths
    g_out, g_last = torch.randn(out.shape, generator=gen, dtype=F64), torch.randn(last.shape, generator=gen, dtype=F64)
    grads = torch.autograd.grad((out.double() * g_out).sum() + (last.double() * g_last).sum(), list(leaves.values()))
    return out, last, dict(zip(leaves, grads))


def check_against_oracle(t, dtype, drop=(), **kw):
    t = {k: v for k, v in t.items() if k not in drop}
    out_r, last_r, g_r = run(t, "naive", F64, **kw)
    out, last, grads = run(t, "cpu", dtype, **kw)
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == F64 else dict(rtol=2e-4, atol=2e-5)
    acc = torch.float32 if dtype != F64 else F64
    assert out.dtype == dtype and last.dtype == acc
    scale = lambda x: max(1.0, x.abs().max().item())  # noqa: E731  (float32 errors grow with the magnitudes)
    torch.testing.assert_close(out.double() / scale(out_r), out_r / scale(out_r), **tol)
    torch.testing.assert_close(last.double() / scale(last_r), last_r / scale(last_r), **tol)
    for k in g_r:
        assert grads[k].dtype == dtype and grads[k].shape == t[k].shape, k
        assert g_r[k].abs().sum() > 0, k
        torch.testing.assert_close(grads[k].double() / scale(g_r[k]), g_r[k] / scale(g_r[k]), **tol,
                                   msg=lambda m: f"gradient of {k}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("negative_eigenvalues", [False, True])
def test_all_features_match_oracle(dtype, reverse, negative_eigenvalues):
    # length 150: two full 64-step checkpoint spans and a partial one; odd heads, headdim, d_state; 3 groups
    check_against_oracle(make(3, 150, 6, 5, 3, 7, D_per_channel=reverse), dtype, dt_softplus=True, reverse=reverse,
                         negative_eigenvalues=negative_eigenvalues)


@pytest.mark.parametrize("h, p, g", [(2, 20, 1), (4, 3, 2), (3, 16, 3), (8, 2, 1)])
def test_heads_across_and_within_channel_blocks(h, p, g):
    # headdim 20: a head spans two blocks (16 + 4 channels); headdim 3 and 2: a block holds several heads
    check_against_oracle(make(2, 67, h, p, g, 5, seed=h), torch.float32, dt_softplus=True, reverse=p % 2 == 1)


@pytest.mark.parametrize("drop", [("D", "z", "dt_bias", "initial_state"), ("z",), ("D",), ("initial_state",)])
@pytest.mark.parametrize("softplus", [False, True])
def test_optional_inputs_match_oracle(drop, softplus):
    t = make(2, 65, 4, 3, 2, 3)
    if not softplus:  # dt must be a step size without the softplus
        t["dt"] = t["dt"].abs()
        t.pop("dt_bias")
    check_against_oracle(t, F64, drop=tuple(k for k in drop if k in t), dt_softplus=softplus)


def test_dt_limit_matches_oracle():
    check_against_oracle(make(2, 70, 4, 3, 1, 4), F64, dt_softplus=True, dt_limit=(0.2, 0.9))


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_packed_sequences_match_oracle(reverse, dtype):
    lens = [70, 1, 0, 129, 5]  # spans across checkpoints, a one-step and an empty sequence
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    t = make(1, sum(lens), 4, 3, 2, 5)
    t["initial_state"] = torch.randn(len(lens), 4, 3, 5, dtype=F64)
    check_against_oracle(t, dtype, dt_softplus=True, reverse=reverse, cu_seqlens=cu, negative_eigenvalues=reverse)


def test_length_zero_returns_the_initial_state():
    t = make(2, 0, 2, 3, 1, 4)
    out, last = ssd_scan(**t, return_final_state=True, impl="cpu")
    assert out.shape == (2, 0, 2, 3)
    torch.testing.assert_close(last, t["initial_state"])


def test_gradcheck():
    t = make(1, 66, 2, 3, 1, 2, D_per_channel=True)
    t["dt"] = t["dt"].abs() + 0.1
    names = list(t)

    def f(*xs):
        kw = dict(zip(names, xs))
        return ssd_scan_cpu(kw["x"], kw["dt"] + kw["dt_bias"][None, None], kw["A"], kw["B"], kw["C"], kw["D"],
                            kw["z"], initial_state=kw["initial_state"], reverse=True, negative_eigenvalues=True)

    assert torch.autograd.gradcheck(f, tuple(v.requires_grad_() for v in t.values()))


def test_bf16_inputs_keep_float32_state():
    t = make(2, 80, 4, 8, 1, 16)
    low = {k: (v.bfloat16() if k in ("x", "B", "C", "z") else v.float()) for k, v in t.items()}
    out, last = ssd_scan(**low, dt_softplus=True, return_final_state=True, impl="cpu")
    assert out.dtype == torch.bfloat16 and last.dtype == torch.float32
    ref, ref_last = ssd_scan(**{k: v.double() for k, v in low.items()}, dt_softplus=True, return_final_state=True,
                             impl="naive")
    assert (out.double() - ref).abs().max() <= 2 * ref.abs().max() * 2**-8
    torch.testing.assert_close(last.double(), ref_last, rtol=1e-4, atol=1e-4)


def test_auto_uses_it_on_cpu_and_falls_back_without_numba(monkeypatch):
    t = {k: v.float() for k, v in make(2, 20, 4, 3, 2, 3).items()}
    assert op._auto(t["x"]) == "cpu"
    torch.testing.assert_close(ssd_scan(**t, dt_softplus=True), ssd_scan(**t, dt_softplus=True, impl="cpu"),
                               rtol=0, atol=0)
    monkeypatch.setattr(m1_fused, "numba", None)  # both fused scans follow the one numba import
    assert op._auto(t["x"]) == "chunked"
    torch.testing.assert_close(ssd_scan(**t, dt_softplus=True), ssd_scan(**t, dt_softplus=True, impl="chunked"),
                               rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=r"mamba-zoo\[cpu\]"):
        ssd_scan(**t, impl="cpu")


def test_torch_compile_fullgraph_takes_the_chunked_path():
    # dynamo cannot trace into numba: under torch.compile "auto" resolves to the chunked form, so fullgraph=True
    # holds, and values and gradients equal the eager fused scan's.
    t = {k: v.requires_grad_() for k, v in make(2, 19, 4, 3, 2, 3).items()}  # float64: the two paths agree exactly
    names = list(t)

    def f(*xs):
        return ssd_scan(**dict(zip(names, xs)), dt_softplus=True, reverse=True)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out_c = compiled(*t.values())
    g_c = torch.autograd.grad(out_c.square().sum(), list(t.values()))
    out_e = f(*t.values())
    g_e = torch.autograd.grad(out_e.square().sum(), list(t.values()))
    torch.testing.assert_close(out_c, out_e, rtol=1e-10, atol=1e-10)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_cuda_tensors_are_refused():
    t = make(1, 3, 2, 2, 1, 2)
    with pytest.raises(ValueError, match="impl='cpu' takes CPU tensors"):
        ssd_scan(**{k: v.to("meta") for k, v in t.items()}, impl="cpu")


def test_second_derivatives_are_refused():
    t = {k: v.requires_grad_() for k, v in make(1, 5, 2, 3, 1, 2).items()}
    out = ssd_scan(**t, dt_softplus=True, impl="cpu")
    (g,) = torch.autograd.grad(out.square().sum(), t["x"], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        g.sum().backward()


def test_mamba2_mixer_trains_on_it(monkeypatch):
    # The Mamba-2 mixer's forward and parameter gradients on the fused scan equal those on the chunked form.
    from zoo.core.mamba2 import Mamba2

    torch.manual_seed(0)
    mixer = Mamba2(d_model=32, d_state=16, headdim=8, ngroups=2).double()
    hidden = torch.randn(2, 70, 32, dtype=F64)
    results = {}
    for impl in ("cpu", "chunked"):
        monkeypatch.setattr(op, "_auto", lambda x, impl=impl: impl)
        mixer.zero_grad()
        out = mixer(hidden)
        out.square().sum().backward()
        results[impl] = (out.detach(), {k: p.grad.clone() for k, p in mixer.named_parameters()})
    torch.testing.assert_close(results["cpu"][0], results["chunked"][0], rtol=1e-9, atol=1e-9)
    for k, g in results["chunked"][1].items():
        torch.testing.assert_close(results["cpu"][1][k], g, rtol=1e-8, atol=1e-9, msg=k)
