"""The decoding steps: the one-step state update (the PyTorch form against one step of the scan oracle, the Triton
kernel against the PyTorch form, in Triton's interpreter on CPU, natively on CUDA), broadcast parameters, bad input,
updates in place; the one-step causal conv kernel; the mixers' in-place step."""
import pytest
import torch

from zoo.core.selective_scan import selective_scan_naive
from zoo.core.selective_scan.step import selective_state_update, selective_state_update_torch
from zoo.kernels.state_update import selective_state_update_triton

F64 = torch.float64
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton kernel: natively on CUDA, else interpreted


def on_dev(a):
    return {k: v.to(DEV) if isinstance(v, torch.Tensor) else v for k, v in a.items()}


def inputs(b=3, h=4, p=5, n=7, g=2, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=F64).to(dtype)  # noqa: E731
    return dict(state=r(b, h, p, n), x=r(b, h, p), dt=r(b, h, p), A=-torch.rand(h, p, n, generator=gen, dtype=F64).to(dtype),
                B=r(b, g, n), C=r(b, g, n), D=r(h, p), z=r(b, h, p), dt_bias=r(h, p))


@pytest.mark.parametrize("negative_eigenvalues", [False, True])
def test_torch_form_is_one_step_of_the_scan(negative_eigenvalues):
    a = inputs(h=1, g=1, dtype=F64)  # a Mamba-1 mixer: one head of d_inner channels
    y, new = selective_state_update_torch(**a, dt_softplus=True, negative_eigenvalues=negative_eigenvalues)
    ref, last = selective_scan_naive(
        a["x"][:, 0, None], a["dt"][:, 0, None], a["A"][0], a["B"][:, 0, None], a["C"][:, 0, None], D=a["D"][0],
        z=a["z"][:, 0, None], delta_bias=a["dt_bias"][0], delta_softplus=True, return_last_state=True,
        initial_state=a["state"][:, 0], negative_eigenvalues=negative_eigenvalues,
    )
    torch.testing.assert_close(y[:, 0], ref[:, 0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new[:, 0], last, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("negative_eigenvalues", [False, True])
@pytest.mark.parametrize("optional", [True, False])
def test_triton_kernel_matches_the_torch_form(negative_eigenvalues, optional):
    a = inputs(b=2, h=4, p=19, n=9, g=2)  # p spans two channel blocks, n not a power of 2
    if not optional:
        a.update(D=None, z=None, dt_bias=None)
    ref = selective_state_update_torch(**a, dt_softplus=True, negative_eigenvalues=negative_eigenvalues)
    out = selective_state_update_triton(**on_dev(a), dt_softplus=True, negative_eigenvalues=negative_eigenvalues)
    for r, o in zip(ref, out):
        torch.testing.assert_close(o.cpu(), r, rtol=1e-5, atol=1e-5)


def test_broadcast_head_parameters_as_mamba2_passes_them():
    a = on_dev(inputs(b=2, h=4, p=6, n=5, g=1))  # expanded on the device: zero strides reach the kernel
    a["A"] = (-torch.rand(4, device=DEV))[:, None, None].expand(4, 6, 5)
    a["dt"] = torch.randn(2, 4, device=DEV)[..., None].expand(2, 4, 6)
    a["D"] = torch.randn(4, device=DEV)[:, None].expand(4, 6)
    ref = selective_state_update_torch(**a, dt_softplus=True)
    out = selective_state_update_triton(**a, dt_softplus=True)
    for r, o in zip(ref, out):  # both on the device here
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)


def test_the_state_passed_in_is_not_modified_and_errors_name_shapes():
    a = inputs()
    before = a["state"].clone()
    selective_state_update(**a)
    assert torch.equal(a["state"], before)
    with pytest.raises(ValueError, match=r"B must be \(batch=3, ngroups, d_state=7\) with ngroups dividing nheads=4, got shape \(3, 3, 7\)"):
        selective_state_update(**{**a, "B": torch.randn(3, 3, 7)})
    with pytest.raises(ValueError, match=r"dt must be \(3, 4, 5\), got shape \(3, 4\)"):
        selective_state_update(**{**a, "dt": torch.randn(3, 4)})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the kernel natively")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_matches_float64(dtype):
    a = inputs(b=4, h=8, p=64, n=128, g=2, dtype=F64)
    ref = selective_state_update_torch(**a, dt_softplus=True)
    cuda = {k: v.to("cuda", dtype if k in ("x", "z", "B", "C") else torch.float32) for k, v in a.items()}
    out = selective_state_update(**cuda, dt_softplus=True)
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    for r, o in zip(ref, out):
        assert (o.double().cpu() - r).abs().max().item() <= tol * max(r.abs().max().item(), 1.0)


@pytest.mark.parametrize("optional", [True, False])
def test_inplace_update_writes_over_the_state(optional):
    """inplace=True returns the state passed in, holding what the out-of-place update returns (Triton kernel
    with its state_out, and the PyTorch path)."""
    a = inputs(b=2, h=4, p=19, n=9, g=2)
    if not optional:
        a.update(D=None, z=None, dt_bias=None)
    want_y, want = selective_state_update(**a, dt_softplus=True)
    for update in (selective_state_update, lambda **k: selective_state_update_triton(**k, state_out=k["state"])):
        b = on_dev({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in a.items()})
        kw = {"inplace": True} if update is selective_state_update else {}
        y, new = update(**b, dt_softplus=True, **kw)
        assert new is b["state"]
        torch.testing.assert_close(new.cpu(), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y.cpu(), want_y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_update_kernel_matches_the_torch_step(k, bias):
    """The one-step causal conv kernel (in Triton's interpreter on CPU, natively on CUDA) against the PyTorch
    step in float64: output, the shifted state, written over the old state or into a new one."""
    from zoo.core.mamba import conv_step
    from zoo.kernels.conv1d import causal_conv1d_update_triton

    gen = torch.Generator().manual_seed(k)
    x, state = torch.randn(3, 150, generator=gen, dtype=F64), torch.randn(3, k - 1, 150, generator=gen, dtype=F64)
    w, bvec = torch.randn(150, 1, k, generator=gen, dtype=F64), torch.randn(150, generator=gen, dtype=F64) if bias else None
    want, want_state = conv_step(x, state, w, bvec)
    f32 = on_dev({"x": x.float(), "conv_state": state.float(), "weight": w.float(), "bias": None if bvec is None else bvec.float()})
    out, new = causal_conv1d_update_triton(**f32, activation="silu")
    torch.testing.assert_close(out.cpu().double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new.cpu().double(), want_state, rtol=1e-6, atol=1e-6)
    held = f32["conv_state"]
    out, new = causal_conv1d_update_triton(**f32, activation="silu", state_out=held)
    assert new is held
    torch.testing.assert_close(new.cpu().double(), want_state, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"expected x \(batch, dim\), weight \(dim, k\) and conv_state \(batch, k - 1, dim\)"):
        causal_conv1d_update_triton(f32["x"], f32["conv_state"][:, :, :10], f32["weight"])


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_mixer_step_in_place_and_the_cached_transition(kind):
    """A mixer's step with inplace=True equals the out-of-place step and writes over the state it is given; the
    cached -exp(A_log) follows an in-place change of A_log."""
    from zoo.core.mamba import Mamba
    from zoo.core.mamba2 import Mamba2

    torch.manual_seed(0)
    mixer = (Mamba(24, d_state=5) if kind == "mamba" else Mamba2(32, d_state=8, headdim=8)).double().eval()
    hidden = torch.randn(2, 6, mixer.d_model, dtype=F64)
    with torch.no_grad():
        _, state = mixer.forward_stream(hidden)
        token = torch.randn(2, 1, mixer.d_model, dtype=F64)
        want, want_state = mixer.step(token, state)
        held = [s.clone() for s in state]
        got, got_state = mixer.step(token, held, inplace=True)
        assert all(g is h for g, h in zip(got_state, held))
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        for g, w in zip(got_state, want_state):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
        mixer.A_log.add_(0.3)  # in place: the cached transition must follow
        moved, _ = mixer.step(token, state)
        mixer.__dict__.pop("_decode_A_cache")
        fresh, _ = mixer.step(token, state)
    torch.testing.assert_close(moved, fresh, rtol=0, atol=0)
    assert not torch.equal(moved, want)
