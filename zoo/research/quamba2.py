"""Post-training quantization with real low-bit storage and integer matmuls, after Quamba2 (Chiang et al.,
"Quamba2: A Robust and Scalable Post-training Quantization Framework for Selective State Space Models",
ICML 2025, arXiv:2503.22879; code github.com/enyac-group/Quamba). Beside :mod:`zoo.research.mambaquant`
(a fake-quant simulation), this module converts a model into one that *holds* int8 or packed int4 weights
and runs its Linears as integer matmuls.

Schemes (``SCHEMES``):

``W8A8``
    int8 weights (symmetric, per output channel) x int8 activations (static scales from calibration):
    ``torch._int_mm`` (int8 x int8 -> int32 accumulation, CPU and CUDA), rescaled by the two scales.
``W4A8``
    int4 weights (per output channel, two a byte in memory) x int8 activations: the packed weights are
    unpacked to int8 for the same ``torch._int_mm``.
``W4A16``
    int4 weights with a scale per output row and group of 128 input columns (Quamba2's group size), activations
    in the model's float dtype: on CUDA a Triton kernel (:mod:`zoo.kernels.quant`) dequantises each group
    inside the matmul; on the CPU the weight is dequantised for ``F.linear``.

What Quamba2 does and what is done here, mixer by mixer (Mamba-1 ``Mamba`` and its subclasses ``BiMamba``,
``SRMamba``; Mamba-2 ``Mamba2``, ``BiMamba2``):

* **Sort-and-cluster of the scan input x** (the conv + SiLU output), for 8-bit activations. Calibration
  records each channel's mean |x| (maxed over batches, as the authors' ``get_act_channel_stats``). Mamba-2,
  as the authors' ``group_wise_sort_indices``: within each SSD group, the channels of every head are sorted by
  that statistic, the heads are clustered by their sorted, L2-normalised profiles (Ward, ``n_head_groups`` = 4)
  and reordered cluster by cluster, and the sorted channel positions of each head cluster are cut into
  ``n_channel_groups`` = 4 contiguous groups (the authors run k-means with ordered initial centres and assert
  contiguity; here the optimal contiguous cut of the same points by dynamic programming, which their code
  leaves as a TODO). Mamba-1 has no heads and its channels are independent: the sorted channels are cut the
  same way into ``n_head_groups * n_channel_groups`` contiguous clusters (the authors' code applies
  sort-and-cluster to Mamba-2 only). The permutation is applied offline to the weights (in_proj rows of x, z
  and dt, conv channels, x_proj columns, dt_proj rows, A, D, dt_bias, the gated norm, out_proj columns), which
  leaves the float model's output unchanged (tested); then each cluster gets its own int8 scale, from a second
  calibration pass.
* **Per-state-group quantization of B and C**: one int8 scale per SSD group of B and one of C (the authors'
  ``PerSSDGroupObserver``); Mamba-1 has one group.
* dt (the scan's step before softplus) and the scan's gate z (Mamba-1) to int8 with per-tensor scales.
  The scan receives these int8 values dequantised (Quamba2's scan kernels load int8 and compute in float;
  the zoo's scan kernels take float inputs), its state and arithmetic stay in float32. A two-direction mixer
  (BiMamba, SRMamba, BiMamba2) has one set of scan-input scales and one permutation, shared by both directions
  (its x comes from one in_proj). The one-token decode ``step`` runs the converted Linears but not this rounding
  (it does not go through the scan hook).
* **Hadamard rotations** of the inputs of each mixer's in_proj and out_proj (``hadamard=True``), fused into the
  weights offline (W H) and applied to the activation online (a fast Walsh-Hadamard transform, block-diagonal
  I (x) H_b when the width is not a power of two, the same matrix as ``mambaquant.hadamard``). The authors
  rotate the whole residual stream (fusing the norms into in_proj) so that in_proj needs no online transform;
  that fusion is family-specific, so here in_proj's rotation is online too (same arithmetic, more work).
* Every ``nn.Linear`` of the model (mixers, heads, MLPs, lm_head) is converted; a Linear the calibration never
  calls as a module (the mixers' ``dt_proj``, whose weight the scan reads) is weight-only: stored low-bit,
  dequantised when read. In Mamba-1, x_proj reads the same clustered int8 x as the scan: the per-channel
  cluster scales are folded into its weight (W diag(s)) before the weight is quantized, so its integer matmul
  takes the scan's int8 x directly. ``nn.Embedding`` rows are stored low-bit (tied to lm_head's quantized
  weight when the model ties them).
* Stays in float: convolutions, norms, the conv input (in_proj's output), the scan's arithmetic and state,
  Mamba-2's gated-norm input z, embeddings' output. Weights are rounded to nearest; the authors' GPTQ is not
  run here.

Usage::

    q = quantize_model(model, calib_batches, scheme="W8A8")   # in place, returns the model
    model_bytes(q)                                             # parameters + buffers, bytes
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from zoo.core.mamba import Mamba
from zoo.core.mamba2 import Mamba2
from zoo.research.mambaquant import _default_forward, _run

SCHEMES = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A16": (4, None)}
GROUP_SIZE = 128  # Quamba2's W4A16 group size (its GPTQ's group_size)
K_ALIGN = 32  # stored input widths are padded to a multiple of this (torch._int_mm on CUDA: multiples of 8; Triton: 32)
N_ALIGN = 8


# --- integer helpers -----------------------------------------------------------------------------------------

def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def _ceil(n: int, m: int) -> int:
    return -(-n // m) * m


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) integers in [-8, 7], K even -> (N, K / 2) uint8: column 2j in the low nibble, 2j + 1 in the high one,
    each stored as q + 8."""
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4: needs an even number of columns, got {q.shape[-1]}")
    if q.numel() and (q.min() < -8 or q.max() > 7):
        raise ValueError(f"pack_int4: values must lie in [-8, 7], got [{int(q.min())}, {int(q.max())}]")
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: (N, K / 2) uint8 -> (N, K) int8."""
    lo = (packed & 15).to(torch.int8) - 8
    hi = (packed >> 4).to(torch.int8) - 8
    return torch.stack([lo, hi], dim=-1).flatten(-2)


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (M, K) int8 @ b (K, N) int8 -> (M, N) int32 through ``torch._int_mm``. cuBLAS needs M > 16 and K, N
    multiples of 8: rows of zeros are appended to reach that (and sliced off); K and N must already be padded
    (the converted weights are)."""
    if a.dtype != torch.int8 or b.dtype != torch.int8 or a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"int8_matmul: expected int8 (M, K) @ int8 (K, N), got {a.dtype} {tuple(a.shape)} @ "
                         f"{b.dtype} {tuple(b.shape)}")
    m = a.shape[0]
    if a.is_cuda:
        if a.shape[1] % 8 or b.shape[1] % 8:
            raise ValueError(f"int8_matmul: on CUDA K and N must be multiples of 8, got K={a.shape[1]}, N={b.shape[1]}")
        rows = max(_ceil(m, 8), 24) if m <= 16 or m % 8 else m
        if rows != m:
            a = F.pad(a, (0, 0, 0, rows - m))
        return torch._int_mm(a, b)[:m]
    if m == 0:
        return a.new_zeros((0, b.shape[1]), dtype=torch.int32)
    return torch._int_mm(a, b)


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """x @ H for H = I_{n/b} (x) H_b / sqrt(b), b the largest power of two dividing n (``mambaquant.hadamard(n)``),
    by log2(b) butterfly steps."""
    n = x.shape[-1]
    b = n & -n
    shape, dtype = x.shape, x.dtype
    y = x.reshape(-1, n // b, b).to(torch.promote_types(dtype, torch.float32))
    h = 1
    while h < b:
        y = y.reshape(-1, n // b, b // (2 * h), 2, h)
        y = torch.stack([y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]], dim=-2)
        h *= 2
    return (y.reshape(shape) * (1.0 / math.sqrt(b))).to(dtype)


def quantize_weight(w: torch.Tensor, bits: int, group_size: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest: (N, K) float -> (int8 values in [-qmax, qmax], scales (N,) or (N, K / group))."""
    w = w.double()
    if group_size is None:
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / qmax(bits)
        q = torch.clamp(torch.round(w / scale[:, None]), -qmax(bits), qmax(bits))
    else:
        g = w.reshape(w.shape[0], -1, group_size)
        scale = g.abs().amax(dim=-1).clamp(min=1e-12) / qmax(bits)
        q = torch.clamp(torch.round(g / scale[..., None]), -qmax(bits), qmax(bits)).reshape(w.shape)
    return q.to(torch.int8), scale.float()


def quantize_act(x: torch.Tensor, scale: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """x / scale rounded to the signed grid, int8."""
    return torch.clamp(torch.round(x / scale), -qmax(bits), qmax(bits)).to(torch.int8)


# --- quantized layers ----------------------------------------------------------------------------------------

class QuantizedLinear(nn.Module):
    """A Linear holding int8 (``w_bits=8``) or packed int4 (``w_bits=4``) weights.

    ``a_bits=8``: y = (Q(x') @ Qw^T) * a_scale * w_scale + b with x' = x H (``hadamard``), x' / s (per input
    channel scales ``in_scale``, folded into the weight: W diag(s)) and Q the int8 rounding at the static
    ``a_scale``; the product is ``torch._int_mm``'s int32. ``a_bits=None``: y = x' W_deq^T + b (W4A16 through the
    Triton kernel on CUDA; weight-only layers). ``weight`` returns the dequantised float weight in the original
    basis (for code that reads it directly, as the mixers do with dt_proj).
    """

    def __init__(self, linear: nn.Linear, w_bits: int, a_bits: Optional[int], a_scale: Optional[float] = None,
                 in_scale: Optional[torch.Tensor] = None, hadamard: bool = False, group_size: Optional[int] = None):
        super().__init__()
        if w_bits not in (4, 8) or a_bits not in (8, None):
            raise ValueError(f"QuantizedLinear: w_bits must be 4 or 8 and a_bits 8 or None, got {w_bits}, {a_bits}")
        if a_bits is not None and group_size is not None:
            raise ValueError("QuantizedLinear: weight groups along the input need float activations (a_bits=None); "
                             "integer matmuls take one scale per output channel")
        if a_bits is not None and a_scale is None:
            raise ValueError("QuantizedLinear: a_bits=8 needs the calibrated activation scale a_scale")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.w_bits, self.a_bits, self.hadamard = w_bits, a_bits, hadamard
        self.dtype = linear.weight.dtype
        k, n = self.in_features, self.out_features
        self.k_pad = _ceil(k, K_ALIGN)
        if group_size is not None:
            group_size = min(group_size, self.k_pad)
            while self.k_pad % group_size:
                group_size //= 2
            group_size = max(group_size, K_ALIGN)
        self.group_size = group_size
        self.n_pad = max(16, _ceil(n, N_ALIGN))  # torch._int_mm on CUDA: N >= 16, a multiple of 8
        w = linear.weight.detach().double()
        if hadamard:
            w = hadamard_transform(w)  # W H: (x H)(W H)^T = x W^T
        if in_scale is not None:
            w = w * in_scale.double().to(w.device)[None, :]
        w = F.pad(w, (0, self.k_pad - k, 0, self.n_pad - n))
        q, scale = quantize_weight(w, w_bits, group_size)
        if w_bits == 4:
            self.register_buffer("qweight", pack_int4(q))
        else:
            self.register_buffer("qweight", q)
        self.register_buffer("w_scale", scale[:n] if group_size is None else scale[:n].contiguous())
        self.register_buffer("in_scale", None if in_scale is None else in_scale.float().clone())
        self.register_buffer("a_scale", None if a_scale is None else torch.tensor(float(a_scale)))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())

    def int_weight(self) -> torch.Tensor:
        """(n_pad, k_pad) int8 weight values (unpacked for int4)."""
        return unpack_int4(self.qweight) if self.w_bits == 4 else self.qweight

    def dequantized(self, basis: str = "stored") -> torch.Tensor:
        """Float32 weight (out, in): ``stored`` as the matmul sees it (rotated, scaled columns), ``original``
        back in the input's basis."""
        q = self.int_weight()[: self.out_features].float()
        if self.group_size is None:
            w = q * self.w_scale[:, None]
        else:
            w = (q.reshape(self.out_features, -1, self.group_size) * self.w_scale[..., None]).reshape(q.shape)
        w = w[:, : self.in_features]
        if basis == "original":
            if self.in_scale is not None:
                w = w / self.in_scale[None, :]
            if self.hadamard:
                w = hadamard_transform(w)  # H is symmetric and orthogonal: (W H) H = W
        return w

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantized("original").to(self.dtype)

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.hadamard:
            x = hadamard_transform(x)
        if self.in_scale is not None:
            x = x / self.in_scale.to(x.dtype)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantizedLinear: expected input (..., {self.in_features}), got {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        # 8-bit activations: rotate and scale in float32 (a bf16 intermediate would round before the int8 grid does).
        x2 = self.transform_input(x2.float() if self.a_bits is not None else x2)
        k, n = self.in_features, self.out_features
        if self.a_bits is not None:
            xq = F.pad(quantize_act(x2.float(), self.a_scale), (0, self.k_pad - k))
            acc = int8_matmul(xq, self.int_weight().t())[:, :n]
            y = acc.float() * (self.a_scale * self.w_scale)
            if self.bias is not None:
                y = y + self.bias
            y = y.to(x.dtype)
        elif x2.is_cuda and self.w_bits == 4 and self.group_size is not None:
            from zoo.kernels.quant import w4a16_matmul_triton

            xp = F.pad(x2, (0, self.k_pad - k)).contiguous()
            y = w4a16_matmul_triton(xp, self.qweight, self.w_scale, self.group_size)[:, :n]
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        else:
            y = F.linear(x2, self.dequantized().to(x2.dtype), None if self.bias is None else self.bias.to(x2.dtype))
        return y.reshape(*lead, n)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, W{self.w_bits}A{self.a_bits or 16}, "
                f"group={self.group_size}, hadamard={self.hadamard}")


def reference_linear(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    """Float64 reference of ``layer``'s arithmetic: the dequantised weight times the activations rounded at the same
    scales (dequantised), plus the bias. The integer path equals it to float rounding."""
    x2 = layer.transform_input(x.reshape(-1, layer.in_features).double())
    if layer.a_bits is not None:
        x2 = quantize_act(x2, layer.a_scale.double()).double() * layer.a_scale.double()
    w = layer.dequantized().double()
    y = x2 @ w.T
    if layer.bias is not None:
        y = y + layer.bias.double()
    return y.reshape(*x.shape[:-1], layer.out_features)


class QuantizedEmbedding(nn.Module):
    """Embedding rows stored low-bit: the rows of a QuantizedLinear's weight (lm_head's own when tied)."""

    def __init__(self, table: QuantizedLinear, owns: bool):
        super().__init__()
        if owns:
            self.table = table
        else:
            object.__setattr__(self, "_tied", table)  # not a submodule: lm_head owns (and moves) the buffers
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features

    def _table(self) -> QuantizedLinear:
        return self.table if "table" in self._modules else self._tied

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised table (num_embeddings, embedding_dim), for code that reads it (or its device)."""
        return self._table().dequantized()[:, : self.embedding_dim].to(self._table().dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = self._table()
        q = t.int_weight()[ids].float()
        if t.group_size is None:
            rows = q * t.w_scale[ids][..., None]
        else:
            rows = (q.reshape(*ids.shape, -1, t.group_size) * t.w_scale[ids][..., None]).flatten(-2)
        return rows[..., : self.embedding_dim].to(t.dtype)


class ScanInputQuant(nn.Module):
    """Int8 scales of a mixer's scan inputs: x per channel (from its clusters), B and C per state group, dt and z
    per tensor. ``mode``: "stats" (pass 1: per-channel mean |x|), "calibrate" (pass 2: absmax), "quantize"."""

    def __init__(self, channels: int, ngroups: int):
        super().__init__()
        self.channels, self.ngroups, self.mode = channels, ngroups, "stats"
        self.register_buffer("x_scale", torch.zeros(channels))
        self.register_buffer("B_scale", torch.zeros(ngroups))
        self.register_buffer("C_scale", torch.zeros(ngroups))
        self.register_buffer("dt_scale", torch.zeros(()))
        self.register_buffer("z_scale", torch.zeros(()))
        self.register_buffer("x_mean_abs", torch.zeros(channels))

    def _groups(self, t):
        return t.reshape(*t.shape[:-1], self.ngroups, -1) if t.dim() == 3 else t  # Mamba-1 B, C: (b, l, n)

    def observe(self, x, dt, B, C, z):
        x = x.detach().float().reshape(-1, self.channels)
        if self.mode == "stats":
            self.x_mean_abs = torch.maximum(self.x_mean_abs, x.abs().mean(0))
            return
        self.x_scale = torch.maximum(self.x_scale, x.abs().amax(0))
        for name, t in (("B_scale", B), ("C_scale", C)):
            g = self._groups(t.detach().float())
            setattr(self, name, torch.maximum(getattr(self, name), g.abs().transpose(-2, 0).reshape(self.ngroups, -1).amax(1)))
        self.dt_scale = torch.maximum(self.dt_scale, dt.detach().float().abs().amax())
        if z is not None:
            self.z_scale = torch.maximum(self.z_scale, z.detach().float().abs().amax())

    def finish(self, clusters: torch.Tensor) -> None:
        """Absmax -> scales: x's absmax per channel becomes its cluster's (the max over the cluster) / 127."""
        amax = torch.zeros(int(clusters.max()) + 1, device=self.x_scale.device).scatter_reduce(
            0, clusters.to(self.x_scale.device), self.x_scale, "amax")
        self.x_scale = amax[clusters.to(self.x_scale.device)].clamp(min=1e-8) / qmax(8)
        for name in ("B_scale", "C_scale", "dt_scale", "z_scale"):
            setattr(self, name, getattr(self, name).clamp(min=1e-8) / qmax(8))
        self.mode = "quantize"

    def fake(self, t, scale):
        return (quantize_act(t.float(), scale).float() * scale).to(t.dtype)

    def quantize(self, x, dt, B, C, z):
        xs = self.x_scale.reshape(x.shape[-2:]) if x.dim() == 4 else self.x_scale
        x = self.fake(x, xs)
        B = self.fake(self._groups(B), self.B_scale[:, None]).reshape(B.shape)
        C = self.fake(self._groups(C), self.C_scale[:, None]).reshape(C.shape)
        dt = self.fake(dt, self.dt_scale)
        z = None if z is None else self.fake(z, self.z_scale)
        return x, dt, B, C, z


def _scan_hook(mixer, scan, x, dt, A, B, C, *args, **kwargs):
    """Installed as a mixer's ``scan_hook``: records or int8-rounds the scan inputs, then scans in float."""
    q = mixer.quamba2
    if q.mode == "quantize":
        x, dt, B, C, z = q.quantize(x, dt, B, C, kwargs.get("z"))
        if kwargs.get("z") is not None:
            kwargs["z"] = z
    else:
        q.observe(x, dt, B, C, kwargs.get("z"))
    return scan(x, dt, A, B, C, *args, **kwargs)


# --- sort-and-cluster ----------------------------------------------------------------------------------------

def contiguous_clusters(points: torch.Tensor, k: int) -> torch.Tensor:
    """Cut n ordered points (n, m) into k contiguous runs minimising the within-run sum of squared distances to
    the run means (dynamic programming, exact). Returns the run sizes (k,) (fewer when n < k)."""
    n = points.shape[0]
    k = min(k, n)
    p = points.double().reshape(n, -1)
    s1 = F.pad(p.cumsum(0), (0, 0, 1, 0))
    s2 = F.pad((p * p).sum(1).cumsum(0), (1, 0))
    i = torch.arange(n + 1)
    length = (i[None, :] - i[:, None]).double()  # run [i, j)
    diff = s1[None, :, :] - s1[:, None, :]
    cost = s2[None, :] - s2[:, None] - (diff * diff).sum(-1) / length.clamp(min=1)
    cost = torch.where(length > 0, cost.clamp(min=0), torch.full_like(cost, math.inf))
    best = cost[0].clone()  # best[j]: one run covering [0, j)
    back: List[torch.Tensor] = []
    for _ in range(1, k):
        total = best[:, None] + cost  # split at i
        best, arg = total.min(0)
        back.append(arg)
    cuts, j = [n], n
    for arg in reversed(back):
        j = int(arg[j])
        cuts.append(j)
    cuts.append(0)
    cuts = cuts[::-1]
    return torch.tensor([b - a for a, b in zip(cuts[:-1], cuts[1:])])


def _ward_labels(points: torch.Tensor, k: int) -> torch.Tensor:
    """Ward agglomerative clustering of (n, m) points into k clusters; labels (n,)."""
    n = points.shape[0]
    if k >= n:
        return torch.arange(n)
    from scipy.cluster.hierarchy import fcluster, linkage

    labels = fcluster(linkage(points.double().cpu().numpy(), method="ward"), t=k, criterion="maxclust")
    return torch.as_tensor(labels - 1, dtype=torch.long)


def sort_and_cluster(stat: torch.Tensor, headdim: int, ngroups: int, n_head_groups: int = 4,
                     n_channel_groups: int = 4) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quamba2's offline reordering of the scan input's channels from the per-channel statistic ``stat`` (C,) =
    (ngroups x heads x headdim). Returns (perm, clusters): new channel i is old channel perm[i]; clusters[i] the
    cluster id of new channel i (a cluster: one SSD group x head group x channel group). Heads stay in their
    SSD group; channels stay in their head."""
    c = stat.numel()
    if c % (ngroups * headdim):
        raise ValueError(f"sort_and_cluster: {c} channels are not ngroups={ngroups} x heads x headdim={headdim}")
    nheads = c // (ngroups * headdim)
    s = stat.double().cpu().reshape(ngroups, nheads, headdim)
    order = s.argsort(dim=-1, stable=True)  # ascending within each head
    sorted_s = s.gather(-1, order)
    profile = sorted_s / sorted_s.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    perm, clusters, next_id = [], [], 0
    for g in range(ngroups):
        labels = _ward_labels(profile[g], n_head_groups)
        head_order = torch.as_tensor(sorted(range(nheads), key=lambda h: (int(labels[h]), h)))
        for label in sorted(set(labels.tolist())):
            heads = [h for h in head_order.tolist() if int(labels[h]) == label]
            sizes = contiguous_clusters(profile[g, heads].T, n_channel_groups)  # points: sorted positions
            pos_cluster = torch.repeat_interleave(torch.arange(len(sizes)) + next_id, sizes)
            next_id += len(sizes)
            for h in heads:
                base = (g * nheads + h) * headdim
                perm.append(base + order[g, h])
                clusters.append(pos_cluster)
    return torch.cat(perm), torch.cat(clusters)


def _take(param: torch.Tensor, index: torch.Tensor, dim: int = 0) -> None:
    param.data = param.data.index_select(dim, index.to(param.device)).contiguous()


@torch.no_grad()
def permute_mixer(mixer: nn.Module, perm: torch.Tensor) -> None:
    """Reorder the scan input's channels of a Mamba / Mamba-2 mixer by ``perm`` (new i <- old perm[i]) through its
    weights; the float mixer's output is unchanged. Mamba-2: ``perm`` must move whole heads within their SSD group
    (as :func:`sort_and_cluster`'s)."""
    perm = perm.long().cpu()
    if isinstance(mixer, Mamba):
        d = mixer.d_inner
        if sorted(perm.tolist()) != list(range(d)):
            raise ValueError(f"permute_mixer: perm must be a permutation of the {d} inner channels")
        rows = torch.cat([perm, perm + d])
        _take(mixer.in_proj.weight, rows)
        if mixer.in_proj.bias is not None:
            _take(mixer.in_proj.bias, rows)
        for sfx in mixer._suffixes():
            conv = getattr(mixer, "conv1d" + sfx)
            _take(conv.weight, perm)
            if conv.bias is not None:
                _take(conv.bias, perm)
            _take(getattr(mixer, "x_proj" + sfx).weight, perm, 1)
            dt_proj = getattr(mixer, "dt_proj" + sfx)
            _take(dt_proj.weight, perm)
            _take(dt_proj.bias, perm)
            _take(getattr(mixer, "A" + sfx + "_log"), perm)
            _take(getattr(mixer, "D" + sfx), perm)
            if hasattr(mixer, "importance" + sfx):
                _take(getattr(mixer, "importance" + sfx).weight, perm, 1)
        _take(mixer.out_proj.weight, perm, 1)
        return
    if isinstance(mixer, Mamba2):
        d_ssm, hd, nh, ng = mixer.d_ssm, mixer.headdim, mixer.nheads, mixer.ngroups
        if sorted(perm.tolist()) != list(range(d_ssm)):
            raise ValueError(f"permute_mixer: perm must be a permutation of the {d_ssm} SSM channels")
        blocks = perm.reshape(nh, hd) // hd
        if not torch.all(blocks == blocks[:, :1]):
            raise ValueError("permute_mixer: a Mamba-2 permutation must keep each head's channels together")
        head_perm = blocks[:, 0]
        per_group = nh // ng
        if not torch.all(head_perm // per_group == torch.arange(nh) // per_group):
            raise ValueError("permute_mixer: a Mamba-2 permutation must keep heads in their SSD group")
        dm = mixer.d_mlp
        n_in = mixer.in_proj.out_features
        rows = torch.arange(n_in)
        rows[2 * dm: 2 * dm + d_ssm] = 2 * dm + perm  # z
        rows[2 * dm + d_ssm: 2 * dm + 2 * d_ssm] = 2 * dm + d_ssm + perm  # x (start of xBC)
        rows[n_in - nh:] = n_in - nh + head_perm  # dt
        _take(mixer.in_proj.weight, rows)
        if mixer.in_proj.bias is not None:
            _take(mixer.in_proj.bias, rows)
        conv_rows = torch.arange(mixer.conv_dim)
        conv_rows[:d_ssm] = perm
        for sfx in ("", "_b") if hasattr(mixer, "conv1d_b") else ("",):
            conv = getattr(mixer, "conv1d" + sfx)
            _take(conv.weight, conv_rows)
            if conv.bias is not None:
                _take(conv.bias, conv_rows)
            _take(getattr(mixer, "dt_bias" + sfx), head_perm)
            _take(getattr(mixer, "A" + sfx + "_log"), head_perm)
            _take(getattr(mixer, "D" + sfx), perm if mixer.D_has_hdim else head_perm)
        if mixer.rmsnorm:
            _take(mixer.norm.weight, perm)
        cols = torch.arange(mixer.out_proj.in_features)
        cols[dm:] = dm + perm
        _take(mixer.out_proj.weight, cols, 1)
        return
    raise TypeError(f"permute_mixer: expected a Mamba or Mamba2 mixer, got {type(mixer).__name__}")


def _mixer_layout(mixer) -> Tuple[int, int, int]:
    """(channels, headdim, ngroups) of the scan input x; Mamba-1 is one head of d_inner channels."""
    if isinstance(mixer, Mamba):
        return mixer.d_inner, mixer.d_inner, 1
    return mixer.d_ssm, mixer.headdim, mixer.ngroups


# --- conversion ----------------------------------------------------------------------------------------------

class _AbsMax:
    def __init__(self, hadamard: bool):
        self.hadamard, self.value, self.count = hadamard, 0.0, 0

    def __call__(self, module, args):
        x = args[0].detach().float()
        if self.hadamard:
            x = hadamard_transform(x)
        self.value = max(self.value, float(x.abs().amax())) if x.numel() else self.value
        self.count += 1


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (each storage once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.device, t.data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    calib_batches: Optional[Iterable] = None,
    scheme: str = "W8A8",
    hadamard: bool = True,
    sort_cluster: bool = True,
    n_head_groups: int = 4,
    n_channel_groups: int = 4,
    forward: Callable = _default_forward,
) -> nn.Module:
    """Convert ``model`` (in place, eval mode) to ``scheme`` (one of ``SCHEMES``); returns it.

    ``calib_batches``: a re-iterable of inputs (as ``mambaquant.quantize_model``), needed for 8-bit activations
    (run twice: channel statistics for sort-and-cluster, then the scales); W4A16 needs none. ``sort_cluster``
    False: one scale for all of x (per-tensor), no reordering (the ablation). Mixers that are not Mamba / Mamba-2
    (Hydra, VMamba's and EfficientVMamba's SS2D) keep a float scan and no reordering; their Linears are converted all
    the same (checked on random vim_tiny with hydra / bimamba2 mixers, vmamba_tiny, efficient_vmamba_tiny).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"quantize_model: scheme must be one of {list(SCHEMES)}, got {scheme!r}")
    for name, v in (("n_head_groups", n_head_groups), ("n_channel_groups", n_channel_groups)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"quantize_model: {name} must be a positive integer, got {v!r}")
    w_bits, a_bits = SCHEMES[scheme]
    calib = list(calib_batches) if calib_batches is not None else []
    if a_bits is not None and not calib:
        raise ValueError(f"quantize_model: {scheme} has 8-bit activations and needs calibration batches, got none")
    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise ValueError("quantize_model: the model is already quantized")
    model.eval()
    mixers = {n: m for n, m in model.named_modules() if isinstance(m, (Mamba, Mamba2))}
    linears: Dict[str, nn.Linear] = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if not linears:
        raise ValueError(f"quantize_model: {type(model).__name__} has no nn.Linear to quantize")
    rotated = {f"{n}.{p}" if n else p for n in mixers for p in ("in_proj", "out_proj")} if hadamard else set()
    folded: Dict[str, str] = {}  # Mamba-1 x_proj -> its mixer: takes the scan's clustered int8 x
    clusters: Dict[str, torch.Tensor] = {}
    if a_bits is not None:
        for name, mixer in mixers.items():
            channels, _, ngroups = _mixer_layout(mixer)
            if mixer.scan_hook is not None:
                raise ValueError(f"quantize_model: mixer {name!r} already has a scan_hook ({mixer.scan_hook!r}); "
                                 "quantize a model without long-context methods installed")
            mixer.quamba2 = ScanInputQuant(channels, ngroups).to(mixer.A_log.device)
            mixer.scan_hook = _scan_hook
            if isinstance(mixer, Mamba):
                for sfx in mixer._suffixes():
                    folded[f"{name}.x_proj{sfx}" if name else f"x_proj{sfx}"] = name
        if sort_cluster and mixers:
            _run(model, calib, forward)  # pass 1: mean |x| per channel
        for name, mixer in mixers.items():
            channels, headdim, ngroups = _mixer_layout(mixer)
            if sort_cluster:
                hg, cg = (1, n_head_groups * n_channel_groups) if isinstance(mixer, Mamba) else (n_head_groups, n_channel_groups)
                perm, clusters[name] = sort_and_cluster(mixer.quamba2.x_mean_abs, headdim, ngroups, hg, cg)
                permute_mixer(mixer, perm)
            else:
                clusters[name] = torch.zeros(channels, dtype=torch.long)
            mixer.quamba2.mode = "calibrate"
        stats = {n: _AbsMax(n in rotated) for n in linears}
        handles = [lin.register_forward_pre_hook(stats[n]) for n, lin in linears.items()]
        try:
            _run(model, calib, forward)  # pass 2: the scales
        finally:
            for h in handles:
                h.remove()
        for name, mixer in mixers.items():
            mixer.quamba2.finish(clusters[name])
    # Replace the Linears (a tied lm_head / embedding pair shares one quantized table).
    tied = {}
    quant: Dict[str, QuantizedLinear] = {}
    for name, lin in linears.items():
        layer_a = a_bits
        a_scale = in_scale = None
        if a_bits is not None:
            if stats[name].count == 0:
                layer_a = None  # never called as a module (dt_proj): weight-only
            elif name in folded:
                in_scale = mixers[folded[name]].quamba2.x_scale
                a_scale = 1.0  # the input divided by its per-channel scales is the int8 grid itself
            else:
                a_scale = max(stats[name].value, 1e-8) / qmax(8)
        group = GROUP_SIZE if layer_a is None and w_bits == 4 else None  # per-group int4 only with float activations
        quant[name] = QuantizedLinear(lin, w_bits, layer_a, a_scale, in_scale, hadamard=name in rotated, group_size=group)
        tied[id(lin.weight)] = quant[name]
    for name, q in quant.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q.to(linears[name].weight.device))
    for name, emb in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Embedding)]:
        if id(emb.weight) in tied and not tied[id(emb.weight)].hadamard and tied[id(emb.weight)].in_scale is None:
            new = QuantizedEmbedding(tied[id(emb.weight)], owns=False)
        else:
            as_linear = nn.Linear(emb.embedding_dim, emb.num_embeddings, bias=False, device=emb.weight.device,
                                  dtype=emb.weight.dtype)
            as_linear.weight.data = emb.weight.data
            new = QuantizedEmbedding(QuantizedLinear(as_linear, w_bits, None, group_size=GROUP_SIZE if w_bits == 4 else None),
                                     owns=True).to(emb.weight.device)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return model
