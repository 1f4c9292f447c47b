"""The Triton SSD kernels against the float64 sequential oracle: values, final states and every gradient, on odd
sizes (partial chunks, headdim and d_state that are not powers of two, several headdim blocks, d_state 256),
reverse, negative eigenvalues, packed sequences, per-head and per-channel D, the z gate, initial states, the
split of a group's heads in the backward. Without a GPU the kernels run in Triton's interpreter on CPU tensors
(conftest.py); with one, on CUDA.

float32 inputs: the kernels' float32 dots are IEEE (no TF32), so the bound is float32 rounding.
"""
import pytest
import torch

import zoo.kernels.ssd.function as ssd_fn
from zoo.core.ssd import ssd_scan

F64 = torch.float64
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def inputs(b, l, h, p, g, n, seed=0, D_per_channel=False, signed=False):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    a = dict(x=r(b, l, h, p), dt=r(b, l, h), A=-torch.rand(h, generator=gen, dtype=F64) * 2 - 0.1,
             B=r(b, l, g, n), C=r(b, l, g, n), D=r(h, p) if D_per_channel else r(h), z=r(b, l, h, p), dt_bias=r(h))
    if signed:  # steps long enough that 2 exp(dt A) - 1 takes both signs
        a["A"] = -torch.linspace(0.3, 6.0, h, dtype=F64)
        a["dt"] = a["dt"].abs() + 0.05
        del a["dt_bias"]
    return a


def run(impl, a, grad_out, grad_last, h0, cu_seqlens=None, **kw):
    """Output, final state and the gradients of <out, grad_out> + <last, grad_last> w.r.t. every input."""
    dtype = F64 if impl == "naive" else torch.float32
    dev = "cpu" if impl == "naive" else DEV
    leaves = {k: v.to(dev, dtype).requires_grad_(True) for k, v in {**a, "h0": h0}.items()}
    args = {k: v for k, v in leaves.items() if k != "h0"}
    out, last = ssd_scan(**args, initial_state=leaves["h0"], return_final_state=True, cu_seqlens=cu_seqlens,
                         dt_softplus="dt_bias" in a, impl=impl, **kw)
    loss = (out * grad_out.to(dev, dtype)).sum() + (last * grad_last.to(dev, dtype)).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return out.double().cpu(), last.double().cpu(), {k: g.double().cpu() for k, g in zip(leaves, grads)}


def check(a, cu_seqlens=None, rtol=2e-5, **kw):
    b, l, h, p = a["x"].shape
    nseq = b if cu_seqlens is None else cu_seqlens.numel() - 1
    gen = torch.Generator().manual_seed(7)
    h0 = torch.randn(nseq, h, p, a["B"].shape[-1], generator=gen, dtype=F64)
    grad_out = torch.randn(b, l, h, p, generator=gen, dtype=F64)
    grad_last = torch.randn(h0.shape, generator=gen, dtype=F64)
    cu = None if cu_seqlens is None else cu_seqlens.to(DEV)
    out, last, grads = run("triton", a, grad_out, grad_last, h0, cu, **kw)
    ref, ref_last, ref_grads = run("naive", a, grad_out, grad_last, h0, cu_seqlens, **kw)

    def close(got, want, what):
        err = (got - want).abs().max().item()
        assert err <= rtol * max(want.abs().max().item(), 1.0), f"{what}: max error {err:.3g}"

    close(out, ref, "out")
    close(last, ref_last, "final state")
    for k in ref_grads:
        close(grads[k], ref_grads[k], f"d{k}")


# (b, l, h, p, g, n): a partial last chunk, several chunks, headdim and d_state off powers of two, one step
CASES = [(2, 37, 4, 12, 2, 10), (1, 70, 6, 5, 3, 17), (3, 9, 2, 3, 1, 4), (1, 1, 2, 8, 2, 16)]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("reverse", [False, True])
def test_values_states_and_gradients_match_the_oracle(case, reverse):
    check(inputs(*case, D_per_channel=case[0] == 2), reverse=reverse)


@pytest.mark.parametrize("reverse", [False, True])
def test_negative_eigenvalues(reverse):
    a = inputs(2, 45, 4, 6, 2, 9, signed=True)
    trans = 2 * torch.exp(a["dt"] * a["A"]) - 1
    assert (trans < 0).any() and (trans > 0).any()
    check(a, reverse=reverse, negative_eigenvalues=True, rtol=1e-4)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("store_ungated", [False, True])
def test_gate_gradient_inside_the_backward_kernels(monkeypatch, reverse, store_ungated):
    """The gate's backward inside the walk and chunk kernels (GATE_PREPASS off), dz from the stored ungated output or
    from the output recomputed in the chunk kernel (STORE_UNGATED off); headdim 70: two headdim blocks."""
    monkeypatch.setattr(ssd_fn, "GATE_PREPASS", False)
    monkeypatch.setattr(ssd_fn, "STORE_UNGATED", store_ungated)
    check(inputs(2, 37, 4, 12, 2, 10, D_per_channel=True), reverse=reverse)
    check(inputs(1, 20, 2, 70, 1, 16))


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("with_z", [False, True])
def test_D_gradient_by_its_own_kernel(monkeypatch, per_channel, with_z):
    """D's gradient summed by its own reduction kernel (DD_SEPARATE) instead of over each chunk's steps in the chunk
    kernel; with z it follows the gate's elementwise pass."""
    monkeypatch.setattr(ssd_fn, "DD_SEPARATE", True)
    a = inputs(2, 37, 4, 12, 2, 10, D_per_channel=per_channel)
    if not with_z:
        del a["z"]
    check(a)


def test_without_D_and_z():
    a = inputs(2, 33, 4, 6, 4, 8)
    del a["D"], a["z"]
    check(a)


@pytest.mark.parametrize("reverse", [False, True])
def test_packed_sequences(reverse):
    lens = [5, 1, 20, 0, 9]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
    check(inputs(1, sum(lens), 4, 3, 2, 5), cu_seqlens=cu, reverse=reverse)


def test_wide_headdim_and_large_state():
    """headdim 70 takes two headdim blocks in every kernel; d_state 256 halves the headdim block."""
    check(inputs(1, 20, 2, 70, 1, 16))
    check(inputs(1, 20, 2, 40, 1, 256))


@pytest.mark.parametrize("block_q, bwd_block_q, bwd_block_p, segment",
                         [(16, 16, None, 2), (32, 32, None, 1), (16, 16, None, 3), (16, 32, 16, 1), (16, 64, None, 2)])
def test_chunk_length_segments_and_head_splits(monkeypatch, block_q, bwd_block_q, bwd_block_p, segment):
    """Other chunk lengths, the backward's longer than the forward's; the backward's segments of several chunks
    (50 steps: 4 chunks of 16 in segments of 2 or 3, the last one short; with backward chunks of 64, one chunk
    per segment of 2); a smaller headdim block in the backward; the backward splitting a group's 6 heads over
    several programs."""
    target = ssd_fn.TARGET_PROGRAMS  # splits are divisors of the heads per group, the fewest reaching the target
    assert ssd_fn._segment_chunks(4096, 128, 32) == 15 and ssd_fn._segment_chunks(4096, 128, 32, 4) == 7 and ssd_fn._segment_chunks(40, 16, 16) == 1
    assert [ssd_fn._splits(6, target // k) for k in (1, 2, 10**6)] == [1, 2, 6] and ssd_fn._splits(7, 1) == 7
    assert ssd_fn._splits(6, target // 3 + 1) == 3
    monkeypatch.setattr(ssd_fn, "BLOCK_Q", block_q)
    monkeypatch.setattr(ssd_fn, "BWD_BLOCK_Q", bwd_block_q)
    monkeypatch.setattr(ssd_fn, "BWD_BLOCK_P", bwd_block_p)
    monkeypatch.setattr(ssd_fn, "TARGET_PROGRAMS", 10**6)
    monkeypatch.setattr(ssd_fn, "_segment_chunks", lambda *a: segment)
    check(inputs(2, 50, 6, 4, 1, 8, D_per_channel=True))
    check(inputs(2, 50, 6, 4, 1, 8), reverse=True)
    check(inputs(2, 50, 6, 4, 1, 8, signed=True), reverse=True, negative_eigenvalues=True, rtol=1e-4)
    if bwd_block_p:  # headdim 40: one block of 64 in the forward, three of 16 in the backward's chunk kernel
        check(inputs(1, 50, 2, 40, 1, 8))


def test_pipelined_head_loop_and_narrow_walks(monkeypatch):
    """The backward chunk kernel's loop over a group's heads with software-pipelining stages; the backward's walks
    over headdim blocks of 16 (headdim 40: three blocks)."""
    monkeypatch.setattr(ssd_fn, "BWD_STAGES", 2)
    monkeypatch.setattr(ssd_fn, "WALK_BLOCK_P", 16)
    check(inputs(1, 37, 2, 40, 1, 10), reverse=True)
    monkeypatch.setattr(ssd_fn, "TARGET_PROGRAMS", 1)
    check(inputs(2, 37, 4, 12, 1, 10, D_per_channel=True))


def test_auto_dispatch():
    a = {k: v.float() for k, v in inputs(1, 8, 2, 4, 1, 4).items()}
    if DEV == "cuda":
        cuda = {k: v.cuda() for k, v in a.items()}
        torch.testing.assert_close(ssd_scan(**cuda), ssd_scan(**cuda, impl="triton"), rtol=0, atol=0)
    else:  # the fused numba scan where numba is installed, else the chunked form
        from zoo.core.ssd import cpu_fused
        want = ssd_scan(**a, impl="cpu" if cpu_fused.available() else "chunked")
        torch.testing.assert_close(ssd_scan(**a), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="impl='triton' needs CUDA tensors of dtype float16, bfloat16 or float32"):
        ssd_scan(**{k: v.double() for k, v in a.items()}, impl="triton")


def test_length_zero_passes_the_initial_state_through():
    a = {k: v.float().to(DEV) for k, v in inputs(2, 0, 2, 4, 1, 4).items()}
    h0 = torch.randn(2, 2, 4, 4, device=DEV, requires_grad=True)
    out, last = ssd_scan(**a, initial_state=h0, return_final_state=True, impl="triton")
    assert out.shape == (2, 0, 2, 4)
    torch.testing.assert_close(last, h0.detach(), rtol=0, atol=0)
    (grad,) = torch.autograd.grad(last.sum(), h0)
    torch.testing.assert_close(grad, torch.ones_like(h0), rtol=0, atol=0)
