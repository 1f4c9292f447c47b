"""The fused CPU selective scan (numba) against the float64 sequential oracle: values, final states and every
gradient, both directions, groups, packed sequences, negative eigenvalues; dispatch and its fallbacks."""
import pytest
import torch

from zoo.core.selective_scan import cpu_fused, op, selective_scan, selective_scan_chunked, selective_scan_naive
from zoo.core.selective_scan.cpu_fused import selective_scan_cpu

pytestmark = pytest.mark.skipif(not cpu_fused.available(), reason="numba is not installed (the 'cpu' extra)")

NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]


def make(b, l, d, n, groups_b=None, groups_c=None, dtype=torch.float32, seed=None):
    g = torch.Generator().manual_seed(torch.seed() % 2**31 if seed is None else seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    bc = lambda gr: (b, l, n) if gr is None else (b, l, gr, n)  # noqa: E731
    return dict(u=r(b, l, d), delta=r(b, l, d) * 0.5, A=-torch.rand(d, n, generator=g, dtype=dtype) - 0.05,
                B=r(*bc(groups_b)), C=r(*bc(groups_c)), D=r(d), z=r(b, l, d), delta_bias=r(d) * 0.3,
                initial_state=r(b, d, n))


def run(fn, t, grads_of, g_out, g_last, **kw):
    """Output, final state and the gradients of <out, g_out> + <last, g_last> w.r.t. every tensor in grads_of."""
    leaves = {k: v.detach().clone().requires_grad_(k in grads_of) for k, v in t.items()}
    out, last = fn(*(leaves.get(k) for k in NAMES[:8]), return_last_state=True,
                   initial_state=leaves.get("initial_state"), **kw)
    loss = (out.double() * g_out).sum() + (last.double() * g_last).sum()
    grads = torch.autograd.grad(loss, [leaves[k] for k in grads_of])
    return out, last, dict(zip(grads_of, grads))


def check_against_oracle(t, dtype, drop=(), **kw):
    """The fused scan on ``dtype`` inputs against the oracle on the same values in float64."""
    t = {k: v for k, v in t.items() if k not in drop}
    t64 = {k: v.double() for k, v in t.items()}
    ref = selective_scan_naive if kw.get("cu_seqlens") is None else _packed_oracle
    out_r, last_r, g_r = run(ref, t64, list(t64), *_cotangents(t64, kw), **kw)
    out, last, grads = run(selective_scan_cpu, {k: v.to(dtype) for k, v in t.items()}, list(t),
                           *_cotangents(t64, kw), **kw)
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)
    assert out.dtype == dtype and last.dtype == dtype
    scale = lambda x: max(1.0, x.abs().max().item())  # noqa: E731  (float32 errors grow with the magnitudes)
    torch.testing.assert_close(out.double() / scale(out_r), out_r / scale(out_r), **tol)
    torch.testing.assert_close(last.double() / scale(last_r), last_r / scale(last_r), **tol)
    for k in g_r:
        assert grads[k].dtype == dtype and grads[k].shape == t[k].shape, k
        torch.testing.assert_close(grads[k].double() / scale(g_r[k]), g_r[k] / scale(g_r[k]), **tol,
                                   msg=lambda m: f"gradient of {k}: {m}")


def _cotangents(t64, kw):
    # fixed per call (seeded by the inputs' shapes) so that both paths see the same ones
    g = torch.Generator().manual_seed(sum(t64["u"].shape))
    b, l, d = t64["u"].shape
    n_seqs = b if kw.get("cu_seqlens") is None else kw["cu_seqlens"].numel() - 1
    return (torch.randn(b, l, d, generator=g, dtype=torch.float64),
            torch.randn(n_seqs, d, t64["A"].shape[1], generator=g, dtype=torch.float64))


def _packed_oracle(u, delta, A, B, C, D, z, delta_bias, delta_softplus=False, return_last_state=True,
                   reverse=False, initial_state=None, cu_seqlens=None, negative_eigenvalues=False):
    """Each packed sequence through the oracle on its own."""
    outs, lasts = [], []
    cu = cu_seqlens.tolist()
    for i, (s, e) in enumerate(zip(cu[:-1], cu[1:])):
        h0 = None if initial_state is None else initial_state[i : i + 1]
        o, h = selective_scan_naive(u[:, s:e], delta[:, s:e], A, B[:, s:e], C[:, s:e], D,
                                    None if z is None else z[:, s:e], delta_bias, delta_softplus, True, reverse, h0,
                                    negative_eigenvalues=negative_eigenvalues)
        outs.append(o)
        lasts.append(h)
    return torch.cat(outs, dim=1), torch.cat(lasts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("negative_eigenvalues", [False, True])
def test_all_features_match_oracle(dtype, reverse, negative_eigenvalues):
    # length 150: two full 64-step checkpoint spans and a partial one; odd dim and d_state
    check_against_oracle(make(3, 150, 9, 5), dtype, delta_softplus=True, reverse=reverse,
                         negative_eigenvalues=negative_eigenvalues)


@pytest.mark.parametrize("groups_b, groups_c", [(3, 3), (3, None), (1, 9)])
def test_groups_match_oracle(groups_b, groups_c):
    check_against_oracle(make(2, 67, 9, 7, groups_b, groups_c), torch.float32, delta_softplus=True, reverse=True)


@pytest.mark.parametrize("drop", [("D", "z", "delta_bias", "initial_state"), ("z",), ("D",)])
@pytest.mark.parametrize("softplus", [False, True])
def test_optional_inputs_match_oracle(drop, softplus):
    check_against_oracle(make(2, 65, 5, 3), torch.float64, drop=drop, delta_softplus=softplus)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_packed_sequences_match_oracle(reverse, dtype):
    lens = [70, 1, 0, 129, 5]  # spans across checkpoints, a one-step and an empty sequence
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    t = make(1, sum(lens), 7, 4)
    t["initial_state"] = torch.randn(len(lens), 7, 4)
    check_against_oracle(t, dtype, delta_softplus=True, reverse=reverse, cu_seqlens=cu, negative_eigenvalues=reverse)


def test_gradcheck():
    t = {k: v.requires_grad_() for k, v in make(1, 66, 2, 2, groups_b=2, dtype=torch.float64).items()}

    def f(*xs):
        kw = dict(zip(NAMES, xs))
        return selective_scan_cpu(*xs[:8], True, True, True, kw["initial_state"], negative_eigenvalues=True)

    assert torch.autograd.gradcheck(f, tuple(t[k] for k in NAMES))


def test_bf16_inputs_keep_float32_state():
    t = make(2, 80, 8, 4)
    low = {k: (v.bfloat16() if k in ("u", "delta", "B", "C", "z") else v) for k, v in t.items()}
    out, last = selective_scan_cpu(*(low[k] for k in NAMES[:8]), True, True, initial_state=low["initial_state"])
    assert out.dtype == torch.bfloat16 and last.dtype == torch.float32
    ref, ref_last = selective_scan_naive(*(low[k].double() for k in NAMES[:8]), True, True,
                                         initial_state=low["initial_state"].double())
    assert (out.double() - ref).abs().max() <= 2 * ref.abs().max() * 2**-8
    torch.testing.assert_close(last.double(), ref_last, rtol=1e-4, atol=1e-4)


def test_auto_uses_it_on_cpu_and_falls_back_without_numba(monkeypatch):
    assert op._resolve("auto", torch.device("cpu")) is selective_scan_cpu
    t = make(2, 20, 6, 3)
    args = [t[k] for k in NAMES[:8]]
    torch.testing.assert_close(selective_scan(*args, True, impl="auto"), selective_scan_cpu(*args, True))
    monkeypatch.setattr(cpu_fused, "numba", None)
    assert op._resolve("auto", torch.device("cpu")) is selective_scan_chunked
    with pytest.raises(RuntimeError, match=r"mamba-zoo\[cpu\]"):
        selective_scan(*args, True, impl="cpu")


def test_torch_compile_fullgraph_takes_the_chunked_path():
    # dynamo cannot trace into numba: under torch.compile "auto" resolves to the chunked path, so
    # fullgraph=True holds, and values and gradients equal the eager fused scan's.
    t = make(2, 19, 6, 3)
    leaves = [t[k].clone().requires_grad_() for k in NAMES[:8]]

    def f(*xs):
        return selective_scan(*xs, True, reverse=True)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out_c = compiled(*leaves)
    g_c = torch.autograd.grad(out_c.square().sum(), leaves)
    out_e = f(*leaves)
    g_e = torch.autograd.grad(out_e.square().sum(), leaves)
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_cuda_tensors_are_refused():
    t = make(1, 3, 2, 2)
    with pytest.raises(ValueError, match="impl='cpu' takes CPU tensors"):
        op._resolve("cpu", torch.device("cuda"))
    assert selective_scan(*(t[k] for k in NAMES[:5]), impl="cpu").shape == (1, 3, 2)


def test_second_derivatives_are_refused():
    t = {k: v.requires_grad_() for k, v in make(1, 5, 3, 2).items()}
    out = selective_scan_cpu(*(t[k] for k in NAMES[:8]), True)
    (g,) = torch.autograd.grad(out.square().sum(), t["u"], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        g.sum().backward()


def test_torch_keeps_its_thread_count():
    # numba's OpenMP pool, started by the first fused scan, used to reset the count torch.set_num_threads gave
    # (a fresh process: the pool starts once per process)
    import subprocess
    import sys

    code = ("import torch; torch.set_num_threads(1)\n"
            "from zoo.core.selective_scan import selective_scan\n"
            "u = torch.randn(1, 5, 4); A = -torch.rand(4, 2); B = torch.randn(1, 5, 2)\n"
            "selective_scan(u, u, A, B, B, impl='cpu')\n"
            "import numba\n"
            "assert torch.get_num_threads() == 1 and numba.get_num_threads() == 1, "
            "(torch.get_num_threads(), numba.get_num_threads())\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=600)
