"""The one-step state update (decoding): the PyTorch form against one step of the scan oracle, the Triton kernel
against the PyTorch form (in Triton's interpreter on CPU, natively on CUDA), broadcast parameters, bad input."""
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
    for r, o in zip(ref, out):
        torch.testing.assert_close(o.cpu(), r, rtol=1e-5, atol=1e-5)


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
