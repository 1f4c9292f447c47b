"""W4A16 matmul: y = x W^T with W held as packed int4 (two weights a byte) and one scale per output row and
group of ``group_size`` input columns, dequantised inside the matmul (the weight never exists in 16 bits in
memory).

Packing (zoo.research.quamba2.pack_int4): byte ``packed[n, j]`` holds column 2j in its low nibble and column
2j + 1 in its high nibble, each stored as q + 8 (q in [-8, 7]). A program owns a (BLOCK_M, BLOCK_N) output
tile and walks K in steps of BLOCK_K columns, all inside one group (group_size % BLOCK_K == 0): it loads the
(BLOCK_N, BLOCK_K / 2) packed bytes, splits them into the even and odd columns, scales them by the group's
scale in the activation dtype and multiplies them with the even and odd columns of x, accumulating in float32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..launch import cdiv

BLOCK_M, BLOCK_N, BLOCK_K = 32, 64, 32


@triton.jit
def _w4a16_kernel(
    x_ptr, p_ptr, s_ptr, out_ptr, M, N, K, s_xm, s_xk, s_pn, s_pk, s_sn, s_sg, s_om, s_on,
    GROUP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    m = tl.program_id(0) * BM + tl.arange(0, BM)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    j = tl.arange(0, BK // 2)
    mmask = m < M
    nmask = n < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + 2 * j  # the even columns of this step
        kmask = kk < K
        x_even = tl.load(x_ptr + m[:, None] * s_xm + kk[None, :] * s_xk, mask=mmask[:, None] & kmask[None, :], other=0.0)
        x_odd = tl.load(x_ptr + m[:, None] * s_xm + (kk + 1)[None, :] * s_xk, mask=mmask[:, None] & kmask[None, :],
                        other=0.0)
        packed = tl.load(p_ptr + n[:, None] * s_pn + (k0 // 2 + j)[None, :] * s_pk, mask=nmask[:, None] & kmask[None, :],
                         other=136).to(tl.int32)  # 136 = 0x88: two zero weights
        scale = tl.load(s_ptr + n * s_sn + (k0 // GROUP) * s_sg, mask=nmask, other=0.0).to(tl.float32)
        w_even = ((packed & 15) - 8).to(tl.float32) * scale[:, None]
        w_odd = ((packed >> 4) - 8).to(tl.float32) * scale[:, None]
        acc += tl.dot(x_even, tl.trans(w_even.to(x_even.dtype)))
        acc += tl.dot(x_odd, tl.trans(w_odd.to(x_odd.dtype)))
    tl.store(out_ptr + m[:, None] * s_om + n[None, :] * s_on, acc.to(out_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


def w4a16_matmul_triton(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """x (M, K) float -> (M, N) in x's dtype; packed (N, K / 2) uint8, scales (N, K / group_size)."""
    if x.dim() != 2 or packed.dim() != 2 or packed.dtype != torch.uint8:
        raise ValueError(f"w4a16_matmul: expected x (M, K) and packed (N, K/2) uint8, got {tuple(x.shape)} and "
                         f"{tuple(packed.shape)} {packed.dtype}")
    M, K = x.shape
    N = packed.shape[0]
    if packed.shape[1] * 2 != K or K % group_size or group_size % BLOCK_K or scales.shape != (N, K // group_size):
        raise ValueError(f"w4a16_matmul: x (M, {K}) needs packed (N, {K // 2}), K and group_size multiples of "
                         f"{BLOCK_K} with group_size | K and scales (N, K / group_size); got packed "
                         f"{tuple(packed.shape)}, group_size {group_size}, scales {tuple(scales.shape)}")
    if not x.is_cuda and os_interpret() is False:
        raise RuntimeError("w4a16_matmul_triton: CPU tensors need Triton's interpreter (TRITON_INTERPRET=1); "
                           "zoo.research.quamba2 dequantises on the CPU instead")
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    grid = (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N))
    _w4a16_kernel[grid](x, packed, scales, out, M, N, K, x.stride(0), x.stride(1), packed.stride(0), packed.stride(1),
                        scales.stride(0), scales.stride(1), out.stride(0), out.stride(1),
                        GROUP=group_size, BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K)
    return out


def os_interpret() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"
