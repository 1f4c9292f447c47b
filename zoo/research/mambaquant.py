"""Post-training W8A8 quantization of any zoo model, after MambaQuant (Xu et al., "MambaQuant:
Quantizing the Mamba Family with Variance Aligned Rotation Methods", ICLR 2025, arXiv:2501.13484).

This is a *fake-quant simulation*: weights and activations are rounded to the int grid and kept in
float; nothing runs int8 kernels, and rotations are applied per layer rather than fused into the
residual stream. Every ``nn.Linear`` of the model is quantized (inside and outside the Mamba
mixers); convolutions, norms, embeddings and the selective scan itself (the paper also quantizes the
scan's matmul inputs) stay in float.

Quantizers (symmetric, round-to-nearest): weights per output channel, scale = max|W_i.| / (2^(b-1)-1);
activations per tensor, a static scale from the largest |x| seen during calibration.

Methods (the same quantizers; they differ in the orthogonal / diagonal transform of each layer, which
leaves the float layer unchanged: x W^T = (x T)(W T^-T)^T):

``per_channel``
    the plain baseline, no transform.
``hadamard``
    QuaRot-style: T = H, a normalised Hadamard matrix (block-diagonal I_m (x) H_2^k when the width
    is not a power of two).
``mambaquant``
    * KLT-enhanced rotation (the paper's offline rotation) on every layer except the mixers' out_proj:
      with the calibration covariance of the layer input Cov(x) = K Lambda K^T (Karhunen-Loeve
      basis K), T = K H. Then Cov(x T) = H^T Lambda H, whose diagonal is sum_i Lambda_i H_ij^2 =
      tr(Lambda)/n for every channel j when |H_ij|^2 = 1/n: the channel variances are aligned,
      which the plain Hadamard transform does not guarantee. With a block-diagonal H the
      eigenvectors are dealt round-robin (by decreasing eigenvalue) to the blocks so that the
      block traces, and so the channel variances, stay close.
    * Smooth-fused rotation (the paper's online rotation) on the mixers' out_proj, whose input y * SiLU(z) carries
      the outliers: first a SmoothQuant-style diagonal s_j = max|x_j|^alpha / max|W_.j|^(1-alpha),
      x -> x / s (fused in deployment into the gate, the paper's scaled SiLU: SiLU(z) / s) and
      W -> W diag(s), then the Hadamard rotation: T = diag(1/s) H.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, Optional

import torch
from torch import nn

from zoo.core.mamba import Mamba

METHODS = ("per_channel", "hadamard", "mambaquant")


def hadamard(n: int, device=None, dtype=torch.float64) -> torch.Tensor:
    """Orthogonal n x n matrix with entries +-1/sqrt(b): I_{n/b} (x) H_b, b the largest power of two
    dividing n (Sylvester construction)."""
    if n < 1:
        raise ValueError(f"hadamard: size must be >= 1, got {n}")
    b = n & -n
    h = torch.ones(1, 1, dtype=dtype, device=device)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return torch.block_diag(*([h / math.sqrt(b)] * (n // b)))


def klt_hadamard(cov: torch.Tensor) -> torch.Tensor:
    """The KLT-enhanced rotation K H for an input covariance ``cov`` (n x n), float64."""
    n = cov.shape[0]
    eigvals, eigvecs = torch.linalg.eigh(cov.double())
    order = eigvals.argsort(descending=True)
    blocks = n // (n & -n)
    # Round-robin: block c gets eigenvalue ranks c, c + blocks, ...; position p = block * size + slot.
    size = n // blocks
    rank = torch.arange(n)
    position = (rank % blocks) * size + rank // blocks
    k = torch.empty_like(eigvecs)
    k[:, position] = eigvecs[:, order]
    return k @ hadamard(n, device=cov.device)


def quantize_symmetric(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Round x / scale to the signed ``bits``-bit grid, clamp, and scale back (fake quantization)."""
    q = 2 ** (bits - 1) - 1
    return torch.clamp(torch.round(x / scale), -q, q) * scale


class QuantLinear(nn.Module):
    """A Linear computing Q_a(x T) Q_w(W T^-T)^T + b, where T is the method's transform (None:
    identity). ``bits=None`` for weights or activations skips that quantizer (float)."""

    def __init__(self, linear: nn.Linear, transform: Optional[torch.Tensor] = None, inverse_t: Optional[torch.Tensor] = None,
                 w_bits: Optional[int] = 8, a_bits: Optional[int] = 8):
        """``inverse_t``: T^-T when T is not orthogonal (for an orthogonal T it is T itself)."""
        super().__init__()
        w = linear.weight.detach().double()
        if transform is not None:
            w = w @ (inverse_t if inverse_t is not None else transform).double()
            self.register_buffer("transform", transform.to(linear.weight.dtype))
        else:
            self.transform = None
        w = w.to(linear.weight.dtype)
        if w_bits is not None:
            w = quantize_symmetric(w, w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / (2 ** (w_bits - 1) - 1), w_bits)
        self.register_buffer("weight", w)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.a_bits = a_bits
        self.register_buffer("act_absmax", torch.zeros(()))
        self.calibrating = a_bits is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transform is not None:
            x = x @ self.transform
        if self.calibrating:
            self.act_absmax = torch.maximum(self.act_absmax, x.detach().abs().amax().float())
        elif self.a_bits is not None:
            x = quantize_symmetric(x, self.act_absmax.clamp(min=1e-12) / (2 ** (self.a_bits - 1) - 1), self.a_bits)
        return nn.functional.linear(x, self.weight, self.bias)


class _InputStats:
    """Running mean, second moment and per-channel absmax of one layer's input."""

    def __init__(self, n: int):
        self.count = 0
        self.sum = torch.zeros(n, dtype=torch.float64)
        self.outer = torch.zeros(n, n, dtype=torch.float64)
        self.absmax = torch.zeros(n, dtype=torch.float64)

    def __call__(self, module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double().cpu()
        self.count += x.shape[0]
        self.sum += x.sum(0)
        self.outer += x.T @ x
        self.absmax = torch.maximum(self.absmax, x.abs().amax(0))

    def covariance(self) -> torch.Tensor:
        mean = self.sum / self.count
        return self.outer / self.count - torch.outer(mean, mean)


def _out_proj_names(model: nn.Module):
    return {f"{name}.out_proj" if name else "out_proj" for name, m in model.named_modules() if isinstance(m, Mamba)}


def _run(model, batches, forward):
    with torch.no_grad():
        for batch in batches:
            forward(model, batch)


def _default_forward(model, batch):
    return model(*batch) if isinstance(batch, tuple) else model(batch)


def quantize_model(
    model: nn.Module,
    calib_batches: Iterable,
    method: str = "mambaquant",
    w_bits: Optional[int] = 8,
    a_bits: Optional[int] = 8,
    alpha: float = 0.5,
    forward: Callable = _default_forward,
) -> nn.Module:
    """Replace every nn.Linear of ``model`` (in place, eval mode) by a calibrated QuantLinear.

    ``calib_batches``: a re-iterable of inputs (a tuple is unpacked into ``model(*batch)``, or pass
    ``forward(model, batch)``); it is run twice, once for input statistics (the KLT covariance and
    smoothing maxima), once for the activation scales after the transforms. A Linear that the
    calibration never calls as a module (the mixers' ``dt_proj``, whose weight the scan reads
    directly) gets weight-only quantization.
    """
    if method not in METHODS:
        raise ValueError(f"quantize_model: method must be one of {METHODS}, got {method!r}")
    calib_batches = list(calib_batches)
    if not calib_batches:
        raise ValueError("quantize_model: needs at least one calibration batch, got none")
    model.eval()
    linears: Dict[str, nn.Linear] = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if not linears:
        raise ValueError(f"quantize_model: {type(model).__name__} has no nn.Linear to quantize")
    stats: Dict[str, _InputStats] = {}
    handles = []
    for name, lin in linears.items():
        stats[name] = _InputStats(lin.in_features)
        handles.append(lin.register_forward_pre_hook(stats[name]))
    try:
        _run(model, calib_batches, forward)
    finally:
        for h in handles:
            h.remove()
    smooth = _out_proj_names(model)
    quant: Dict[str, QuantLinear] = {}
    for name, lin in linears.items():
        n = lin.in_features
        device = lin.weight.device
        transform = inverse_t = None
        layer_a_bits = a_bits
        if stats[name].count == 0:
            # Never called as a module (the mixers' dt_proj: the scan reads its weight and bias):
            # weight-only quantization, no transform, so that direct weight reads stay correct.
            layer_a_bits = None
        elif method == "hadamard":
            transform = hadamard(n, device=device)
        elif method == "mambaquant" and name in smooth:
            w_max = lin.weight.detach().double().abs().amax(0).cpu().clamp(min=1e-8)
            s = (stats[name].absmax.clamp(min=1e-8) ** alpha / w_max ** (1 - alpha)).to(device)
            h = hadamard(n, device=device)
            transform, inverse_t = h / s[:, None], s[:, None] * h  # diag(1/s) H and its inverse-transpose
        elif method == "mambaquant":
            transform = klt_hadamard(stats[name].covariance()).to(device)
        quant[name] = QuantLinear(lin, transform, inverse_t, w_bits, layer_a_bits).to(device)
    for name, q in quant.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, q)
    if any(q.calibrating for q in quant.values()):
        _run(model, calib_batches, forward)
        for q in quant.values():
            q.calibrating = False
    return model
