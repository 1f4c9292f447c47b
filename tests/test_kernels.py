"""Triton selective-scan kernels against the sequential oracle, values and every gradient.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1) on CPU tensors, so CI
checks the kernel code itself; sizes are small and odd (partial chunks, partial channel blocks,
non-power-of-two d_state). Skipped only when triton cannot be imported.
"""
import pytest
import torch

# conftest.py sets TRITON_INTERPRET=1 when there is no GPU, before any module imports the kernels.
pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

from zoo.core.selective_scan import selective_scan, selective_scan_multi, selective_scan_naive  # noqa: E402
from zoo.kernels.selective_scan import selective_scan_multi_triton, selective_scan_triton  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def make(b, l, d, n, dtype=torch.float32, groups=None, k=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    lead = () if k is None else (k,)

    def r(*s, scale=1.0, dt=dtype):
        return (torch.randn(*s, generator=g) * scale).to(dt).to(DEV)

    bc = (*lead, b, l, n) if groups is None else (*lead, b, l, groups, n)
    return dict(
        u=r(*lead, b, l, d), delta=r(*lead, b, l, d, scale=0.5),
        A=(-torch.rand(*lead, d, n, generator=g) - 0.2).to(DEV), B=r(*bc), C=r(*bc),
        D=r(*lead, d, dt=torch.float32), z=r(*lead, b, l, d), delta_bias=r(*lead, d, scale=0.3, dt=torch.float32),
    )


def rel(x, ref):
    assert torch.isfinite(x).all()
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def compare(fn, ref_fn, t, tol, seed=0):
    """Run fn and the float64 ref_fn on the same values; compare outputs and all gradients. Returns the reference
    output."""
    keys = [k for k, v in t.items() if v is not None]
    ins = {k: t[k].detach().clone().requires_grad_(True) for k in keys}
    out, last = fn(**ins)
    g = torch.Generator().manual_seed(seed + 1)
    w_out = torch.randn(out.shape, generator=g).to(out.dtype).to(DEV)
    w_last = torch.randn(last.shape, generator=g).to(DEV)
    grads = torch.autograd.grad([out, last], [ins[k] for k in keys], [w_out, w_last])
    ins64 = {k: t[k].detach().double().requires_grad_(True) for k in keys}
    out64, last64 = ref_fn(**ins64)
    grads64 = torch.autograd.grad([out64, last64], [ins64[k] for k in keys], [w_out.double(), w_last.double()])
    errs = {"out": rel(out, out64), "last": rel(last, last64)}
    errs.update({f"d{k}": rel(a, b) for k, a, b in zip(keys, grads, grads64)})
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f"relative errors above {tol}: {bad}"
    return out64


CASES = [
    # b, l, d, n, groups, reverse, with h0, optional inputs on
    (2, 37, 11, 5, None, False, True, True),
    (2, 37, 12, 5, 3, True, True, True),
    (1, 19, 6, 1, None, True, False, False),
    (1, 23, 5, 33, None, False, True, True),
]


@pytest.mark.parametrize("b,l,d,n,groups,reverse,h0,full", CASES)
def test_scan_matches_oracle(b, l, d, n, groups, reverse, h0, full):
    t = make(b, l, d, n, groups=groups, seed=l + d + n)
    if not full:
        t.update(D=None, z=None, delta_bias=None)
    t["initial_state"] = torch.randn(b, d, n).to(DEV) if h0 else None
    kw = dict(delta_softplus=full, return_last_state=True, reverse=reverse)
    compare(lambda **x: selective_scan_triton(**x, **kw), lambda **x: selective_scan_naive(**x, **kw), t, 1e-5)


def test_strided_bdl_layout_and_mixed_groups():
    """(b, d, l) storage read through channels-last views (no copies); B shared, C grouped."""
    t = make(2, 29, 12, 4, seed=3)
    for key in ("u", "delta", "z"):
        t[key] = t[key].transpose(1, 2).contiguous().transpose(1, 2)
        assert not t[key].is_contiguous()
    t["C"] = torch.randn(2, 29, 4, 4).to(DEV)
    t["initial_state"] = None
    kw = dict(delta_softplus=True, return_last_state=True)
    compare(lambda **x: selective_scan_triton(**x, **kw), lambda **x: selective_scan_naive(**x, **kw), t, 1e-5)


def packed_reference(cu, kw):
    """The oracle run on each packed sequence of ``cu`` alone (an empty one passes its initial state through)."""
    def ref(initial_state, **x):
        outs, lasts = [], []
        for i, (s, e) in enumerate(zip(cu, cu[1:])):
            h0 = initial_state[i : i + 1]
            if s == e:  # empty sequence: no tokens, the state passes through
                outs.append(x["u"][:, :0])
                lasts.append(h0)
                continue
            part = {k: (v[:, s:e] if k in ("u", "delta", "z", "B", "C") else v) for k, v in x.items()}
            o, h = selective_scan_naive(**part, initial_state=h0, **kw)
            outs.append(o)
            lasts.append(h)
        return torch.cat(outs, 1), torch.cat(lasts, 0)
    return ref


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_float32_state(dtype):
    t = make(2, 33, 8, 4, dtype=dtype, seed=5)
    t["initial_state"] = None
    kw = dict(delta_softplus=True, return_last_state=True)
    # Inputs are exact in both paths; the only error is rounding the per-token outputs/grads to
    # the input dtype (the interpreter's bf16 cast truncates), so the bound is a few units of it.
    tol = 8e-3 if dtype == torch.bfloat16 else 1e-3
    compare(lambda **x: selective_scan_triton(**x, **kw), lambda **x: selective_scan_naive(**x, **kw), t, tol)


def test_packed_sequences_match_separate_calls():
    cu = [0, 1, 14, 14, 30]
    t = make(1, 30, 8, 4, groups=2, seed=6)
    t["initial_state"] = torch.randn(4, 8, 4).to(DEV)
    cu_t = torch.tensor(cu, dtype=torch.int32, device=DEV)
    kw = dict(delta_softplus=True, return_last_state=True, reverse=True)

    ref = packed_reference(cu, kw)

    compare(lambda **x: selective_scan_triton(**x, cu_seqlens=cu_t, **kw), ref, t, 1e-5)


def test_multi_direction_one_launch():
    """VMamba's four cross-scan directions over a 3 x 5 image with u and z shared (index
    arithmetic, no copies) against the per-direction PyTorch path, which gathers tokens."""
    dirs = ("forward", "reverse", "forward_t", "reverse_t")
    t = make(2, 15, 6, 4, k=4, seed=7)
    t["u"], t["z"] = t["u"][0], t["z"][0]
    t["initial_state"] = torch.randn(4, 2, 6, 4).to(DEV)
    kw = dict(delta_softplus=True, return_last_state=True, directions=dirs, hw=(3, 5))
    compare(lambda **x: selective_scan_multi_triton(**x, **kw),
            lambda **x: selective_scan_multi(**x, **kw, impl="naive"), t, 1e-5)


def test_multi_direction_packed_sequences():
    """Vim's pair over packed sequences (one empty) with per-sequence initial states."""
    t = make(1, 25, 6, 4, k=2, seed=21)
    t["initial_state"] = torch.randn(2, 3, 6, 4).to(DEV)
    cu = torch.tensor([0, 7, 7, 25], device=DEV)
    kw = dict(delta_softplus=True, return_last_state=True, directions=("forward", "reverse"), cu_seqlens=cu)
    compare(lambda **x: selective_scan_multi_triton(**x, **kw),
            lambda **x: selective_scan_multi(**x, **kw, impl="naive"), t, 1e-5)


def test_deterministic_backward_is_bitwise_repeatable():
    t = make(2, 21, 20, 4, seed=8)
    ins = {k: v.requires_grad_(True) for k, v in t.items()}

    def grads():
        out = selective_scan_triton(**ins, delta_softplus=True, block_d=4)  # 5 channel blocks share B/C
        return torch.autograd.grad(out, [ins["B"], ins["C"], ins["A"]], torch.ones_like(out))

    fast = grads()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = grads(), grads()
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert all(rel(a, b) < 1e-6 for a, b in zip(first, fast))


def test_core_op_dispatches_to_triton():
    t = make(1, 17, 4, 3, seed=9)
    out = selective_scan(**t, delta_softplus=True, impl="triton")
    ref = selective_scan(**t, delta_softplus=True, impl="naive")
    assert rel(out, ref) < 1e-5


def test_custom_op_registration():
    """The ops pass torch.library's checks (schema, fake tensors, autograd registration)."""
    from zoo.kernels.selective_scan.function import _scan_fwd

    t = make(1, 9, 4, 2, seed=10)
    args = (t["u"][None], t["delta"][None], t["A"][None], t["B"][None, :, :, None], t["C"][None, :, :, None],
            t["D"][None], t["z"][None], t["delta_bias"][None], None,
            torch.zeros(1, dtype=torch.int32, device=DEV), None, 1, 1, True, True, 8, 0)
    for a in args[:8]:
        a.requires_grad_(True)
    torch.library.opcheck(_scan_fwd, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_compiles_without_graph_breaks():
    t = make(1, 11, 4, 3, seed=11)
    ins = {k: v.requires_grad_(True) for k, v in t.items()}

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(u, delta, A, B, C, D, z, delta_bias):
        return selective_scan_triton(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=True) * 2

    out = f(**ins)
    ref = selective_scan_naive(**{k: v.detach() for k, v in t.items()}, delta_softplus=True) * 2
    assert rel(out, ref) < 1e-5
    out.sum().backward()
    assert all(v.grad is not None and torch.isfinite(v.grad).all() for v in ins.values())


def test_mixer_compiles_without_graph_breaks(monkeypatch):
    """A zoo mixer (Vim's BiMamba) under torch.compile(fullgraph=True) with the scan on the
    Triton custom op (forced here for CPU tensors, which auto-dispatch to the PyTorch path)."""
    from zoo.core.mamba import BiMamba
    from zoo.core.selective_scan import op

    torch.manual_seed(14)
    m = BiMamba(16, d_state=4).to(DEV)
    x = torch.randn(1, 9, 16, device=DEV)
    ref = m(x)
    monkeypatch.setattr(op, "_resolve", lambda impl, device, negative_eigenvalues=False: selective_scan_triton)
    out = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    assert rel(out, ref) < 1e-5
    out.sum().backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_unknown_direction_names_choices():
    t = make(1, 4, 2, 2, k=1)
    with pytest.raises(ValueError, match="unknown direction 'sideways'"):
        selective_scan_multi(**t, directions=("sideways",), impl="triton")


@pytest.mark.parametrize("reverse", [False, True])
def test_segmented_long_sequence_path(monkeypatch, reverse):
    """Few programs: the sequence is cut into segments scanned in parallel and chained
    (forward and backward), here 3 segments of 9 chunks of 4 steps, the last one partial."""
    from zoo.kernels.selective_scan import function

    monkeypatch.setattr(function, "_SEGMENT_BELOW", 1 << 20)
    assert function._segments(1, 101, 4, False) == (3, 36)
    t = make(1, 101, 3, 4, seed=12)
    t["initial_state"] = None if reverse else torch.randn(1, 3, 4).to(DEV)
    kw = dict(delta_softplus=True, return_last_state=True, reverse=reverse)
    compare(lambda **x: selective_scan_triton(**x, block_t=4, **kw), lambda **x: selective_scan_naive(**x, **kw), t,
            1e-5)


@pytest.mark.parametrize("reverse,activation", [(False, "silu"), (True, None)])
def test_causal_conv1d_matches_torch(reverse, activation):
    from zoo.core.mamba import causal_conv1d
    from zoo.kernels.conv1d import causal_conv1d_triton

    g = torch.Generator().manual_seed(13)
    # (b, d, l) storage seen as (b, l, d): strided input; odd length and dim (partial tiles)
    x = torch.randn(2, 70, 45, generator=g).to(DEV).transpose(1, 2).requires_grad_(True)
    w = torch.randn(70, 1, 4, generator=g).to(DEV).requires_grad_(True)
    b = torch.randn(70, generator=g).to(DEV).requires_grad_(True)
    out = causal_conv1d_triton(x, w, b, reverse=reverse, activation=activation)
    x64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    ref = causal_conv1d(x64, w64, b64, reverse=reverse)
    ref = torch.nn.functional.silu(ref) if activation else ref
    assert rel(out, ref) < 1e-5
    gout = torch.randn(out.shape, generator=g).to(DEV)
    grads = torch.autograd.grad(out, [x, w, b], gout)
    grads64 = torch.autograd.grad(ref, [x64, w64, b64], gout.double())
    assert all(rel(a, r) < 1e-5 for a, r in zip(grads, grads64))


@pytest.mark.parametrize("dtype,has_residual,residual_in_fp32", [
    (torch.float32, True, True), (torch.float32, False, True), (torch.bfloat16, True, False),
])
def test_fused_add_rms_norm_matches_add_norm(dtype, has_residual, residual_in_fp32):
    from zoo.core.block import add_norm_reference
    from zoo.core.norm import RMSNorm
    from zoo.kernels.norm import add_rms_norm_triton

    g = torch.Generator().manual_seed(15)
    h = torch.randn(3, 5, 37, generator=g).to(dtype).to(DEV).requires_grad_(True)
    r_dtype = torch.float32 if residual_in_fp32 else dtype
    r = torch.randn(3, 5, 37, generator=g).to(r_dtype).to(DEV).requires_grad_(True) if has_residual else None
    norm = RMSNorm(37).to(DEV)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(37, generator=g))
    out, rout = add_rms_norm_triton(h, r, norm.weight, 1e-5, residual_in_fp32)
    ref, rref = add_norm_reference(h, r, norm, None, residual_in_fp32)
    assert out.dtype == ref.dtype and rout.dtype == rref.dtype
    ins = [h, norm.weight] + ([r] if has_residual else [])
    w1 = torch.randn(out.shape, generator=g).to(DEV)
    w2 = torch.randn(rout.shape, generator=g).to(DEV)
    got = torch.autograd.grad([out, rout], ins, [w1.to(out.dtype), w2.to(rout.dtype)])
    want = torch.autograd.grad([ref, rref], ins, [w1.to(ref.dtype), w2.to(rref.dtype)])
    # float32: rounding only; bfloat16: a few units of bf16 rounding (the interpreter truncates)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel(out, ref) < tol and rel(rout, rref) < tol
    assert all(rel(a, b) < tol for a, b in zip(got, want))


@pytest.mark.parametrize("first_block", [True, False])
def test_add_norm_dispatches_to_the_fused_kernel(monkeypatch, first_block):
    """The core's add_norm takes the fused kernel where it applies (CUDA; here forced onto the
    interpreter) with the reference's semantics: drop path on the block output, none in the first
    block, where the residual stream starts as the embedding itself."""
    from zoo.core import block
    from zoo.core.norm import RMSNorm

    calls = []
    monkeypatch.setattr(block, "_fused_add_norm_applies", lambda *a: calls.append(1) or True)
    g = torch.Generator().manual_seed(21)
    h = torch.randn(2, 7, 24, generator=g).to(DEV).requires_grad_(True)
    r = None if first_block else torch.randn(2, 7, 24, generator=g).to(DEV).requires_grad_(True)
    norm = RMSNorm(24).to(DEV)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(24, generator=g))
    halve = lambda x: x * 0.5  # noqa: E731 - a deterministic stand-in for DropPath
    out, rout = block.add_norm(h, r, norm, halve)
    ref, rref = block.add_norm_reference(h, r, norm, halve)
    assert calls and rout.dtype == torch.float32
    assert rel(out, ref) < 1e-5 and rel(rout, rref) < 1e-5
    ins = [h, norm.weight] + ([] if first_block else [r])
    got = torch.autograd.grad([out.sum(), rout.square().sum()], ins)
    want = torch.autograd.grad([ref.sum(), rref.square().sum()], ins)
    assert all(rel(a, b) < 1e-5 for a, b in zip(got, want))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the mixer dispatches to the kernels only for CUDA tensors")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bimamba_mixer_cuda_matches_cpu_float64(dtype):
    """The whole mixer on CUDA (Triton conv1d + scan, chosen by dispatch) against the same weights on
    the CPU path in float64: output and every parameter gradient."""
    from zoo.core import BiMamba

    torch.manual_seed(0)
    ref = BiMamba(40, d_state=12, divide_out=True).double()
    fast = BiMamba(40, d_state=12, divide_out=True).cuda()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(3, 77, 40, dtype=torch.float64)
    y_ref = ref(x)
    y_ref.square().sum().backward()
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        y = fast(x.float().cuda())
    y.float().square().sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16 autocast rounds the projections too
    assert rel(y.float().cpu(), y_ref) < tol
    grads = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        assert rel(p.grad.cpu(), grads[name].grad) < 10 * tol, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the model dispatches to the kernels only for CUDA tensors")
def test_vim_cuda_matches_cpu_float64():
    """A whole (small) Vim on CUDA, every Triton path dispatched (fused add + RMSNorm, conv1d, scan), in
    float32 against the CPU path in float64: logits and every parameter gradient, and the logits
    again under inference_mode."""
    import zoo

    torch.manual_seed(0)
    kw = dict(embed_dim=48, depth=3, patch_size=8, stride=8, img_size=40, num_classes=7)
    ref = zoo.create_model("vim_tiny", **kw).double().eval()
    fast = zoo.create_model("vim_tiny", **kw).cuda().eval()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 40, 40, dtype=torch.float64)
    y_ref = ref(x)
    y_ref.square().sum().backward()
    y = fast(x.float().cuda())
    y.square().sum().backward()
    assert rel(y.cpu(), y_ref) < 1e-5
    grads = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        assert rel(p.grad.cpu(), grads[name].grad) < 1e-4, name
    with torch.inference_mode():
        assert rel(fast(x.float().cuda()).cpu(), y_ref) < 1e-5


def test_scan_after_inference_mode_still_differentiable():
    """Tensors the launcher caches between calls must not carry inference mode into a later training step."""
    t, m = make(1, 9, 6, 4), make(1, 9, 6, 4, k=2)
    with torch.inference_mode():
        selective_scan_triton(t["u"], t["delta"], t["A"], t["B"], t["C"], reverse=True)
        selective_scan_multi_triton(m["u"], m["delta"], m["A"], m["B"], m["C"])
    u = t["u"].clone().requires_grad_(True)
    selective_scan_triton(u, t["delta"], t["A"], t["B"], t["C"], reverse=True).sum().backward()
    mu = m["u"].clone().requires_grad_(True)
    selective_scan_multi_triton(mu, m["delta"], m["A"], m["B"], m["C"]).sum().backward()
    assert torch.isfinite(u.grad).all() and torch.isfinite(mu.grad).all()
