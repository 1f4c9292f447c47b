"""MIL baselines that MambaMIL is compared with: ABMIL (Ilse et al., ICML 2018) and TransMIL
(Shao et al., NeurIPS 2021), with the parameter names of the copies in isyangshu/MambaMIL
(``models/ABMIL.py``, ``models/TransMIL.py``), so checkpoints from that code load by name.

Both take the same inputs as :class:`~zoo.models.mil.mambamil.MambaMIL` (one bag, equal-size
bags, a list of bags, or packed bags with ``cu_seqlens``) and return (num_bags, num_classes).
ABMIL pools all bags of a batch in one pass over the packed instances. TransMIL runs bag by bag:
it reshapes each bag into its own square grid for the PPEG convolutions.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import nn

from zoo.core.checks import check_num_classes, check_sizes
from zoo.registry import build_model, register_model, register_pretrained_cfgs

from .bags import Bags, attention_pool, pack_bags
from .mambamil import _init_official, make_projection

__all__ = ["ABMIL", "TransMIL", "NystromAttention"]


class ABMIL(nn.Module):
    """Attention-based deep MIL. ``gated=True``: gated attention, a_i ∝ exp(w^T (tanh(V h_i) ⊙
    sigmoid(U h_i))) (the paper's main variant; official ``GatedAttention``); ``gated=False``:
    a_i ∝ exp(w^T tanh(V h_i)) (official ``DAttention``, the "att_mil" of MambaMIL's tables)."""

    def __init__(
        self,
        in_dim: int = 1024,
        num_classes: int = 2,
        embed_dim: int = 512,
        attn_dim: int = 128,
        gated: bool = True,
        act: str = "relu",
        drop_rate: float = 0.25,
    ):
        super().__init__()
        check_num_classes("ABMIL", num_classes)
        check_sizes("ABMIL", attn_dim=attn_dim)
        self.in_dim, self.num_classes, self.embed_dim, self.gated = in_dim, num_classes, embed_dim, gated
        self.num_features = self.head_hidden_size = embed_dim
        self.pretrained_cfg: dict = {}  # filled in by build_model
        self.grad_checkpointing = False
        self.feature = make_projection(in_dim, embed_dim, act, drop_rate, "ABMIL")
        if gated:
            self.attention_V = nn.Sequential(nn.Linear(embed_dim, attn_dim), nn.Tanh())
            self.attention_U = nn.Sequential(nn.Linear(embed_dim, attn_dim), nn.Sigmoid())
            self.attention_weights = nn.Linear(attn_dim, 1)
        else:
            self.attention = nn.Sequential(nn.Linear(embed_dim, attn_dim), nn.Tanh(), nn.Linear(attn_dim, 1))
        self.reset_classifier(num_classes)

    def attention_scores(self, h: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.attention_weights(self.attention_V(h) * self.attention_U(h))[:, 0]
        return self.attention(h)[:, 0]

    def forward_features(self, bags: Bags, cu_seqlens: Optional[torch.Tensor] = None, return_attention: bool = False):
        x, cu = pack_bags(bags, cu_seqlens, self.in_dim, "ABMIL")
        x = x.to(self.feature[0].weight.dtype)
        if self.grad_checkpointing and torch.is_grad_enabled():  # recompute the instance MLP and its attention
            h, scores = torch.utils.checkpoint.checkpoint(self._instances, x, use_reentrant=False)
        else:
            h, scores = self._instances(x)
        pooled, weights = attention_pool(scores, h, cu)
        return (pooled, weights) if return_attention else pooled

    def _instances(self, x: torch.Tensor):
        h = self.feature(x)
        return h, self.attention_scores(h)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.classifier(x)

    def forward(self, bags: Bags, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(bags, cu_seqlens))

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        # Sequential keeps the official key "classifier.0.weight".
        self.classifier = nn.Sequential(nn.Linear(self.embed_dim, num_classes)) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        """The Linear classifier (``classifier.0``, the cfg's ``classifier``)."""
        return self.classifier[0] if isinstance(self.classifier, nn.Sequential) else self.classifier

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the instance features and attention scores in the backward (they hold the bag-size
        activations)."""
        self.grad_checkpointing = enable


def _iterative_pinv(x: torch.Tensor, iters: int) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse by the Razavi et al. iteration used in Nystromformer."""
    z = x.transpose(-1, -2) / (x.abs().sum(-1).max() * x.abs().sum(-2).max())
    eye = torch.eye(x.shape[-1], device=x.device, dtype=x.dtype)
    for _ in range(iters):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


class NystromAttention(nn.Module):
    """Multi-head self-attention with the Nystrom approximation (Xiong et al., 2021), as used by
    TransMIL, plus a depthwise conv over values (kernel ``residual_conv_kernel``) added to the
    output. ``exact=True`` replaces the approximation by exact softmax attention (same parameters);
    the sequence is padded at the front to a multiple of ``num_landmarks`` in both cases."""

    def __init__(
        self,
        dim: int,
        dim_head: int = 64,
        heads: int = 8,
        num_landmarks: int = 256,
        pinv_iterations: int = 6,
        residual_conv_kernel: int = 33,
        dropout: float = 0.0,
        exact: bool = False,
    ):
        super().__init__()
        self.heads, self.num_landmarks, self.pinv_iterations, self.exact = heads, num_landmarks, pinv_iterations, exact
        self.scale = dim_head**-0.5
        self.to_qkv = nn.Linear(dim, heads * dim_head * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim), nn.Dropout(dropout))
        k = residual_conv_kernel
        self.res_conv = nn.Conv2d(heads, heads, (k, 1), padding=(k // 2, 0), groups=heads, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        m = self.num_landmarks
        x = F.pad(x, (0, 0, (-n) % m, 0))  # front padding, as in the reference implementation
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.to_qkv(x).chunk(3, dim=-1))
        q = q * self.scale
        if self.exact:
            out = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
        else:
            group = x.shape[1] // m  # each landmark is the mean of `group` consecutive tokens
            q_l = q.unflatten(2, (m, group)).mean(3)
            k_l = k.unflatten(2, (m, group)).mean(3)
            attn1 = torch.softmax(q @ k_l.transpose(-1, -2), dim=-1)
            attn2 = torch.softmax(q_l @ k_l.transpose(-1, -2), dim=-1)
            attn3 = torch.softmax(q_l @ k.transpose(-1, -2), dim=-1)
            out = (attn1 @ _iterative_pinv(attn2, self.pinv_iterations)) @ (attn3 @ v)
        out = out + self.res_conv(v)
        out = self.to_out(out.transpose(1, 2).flatten(2))
        return out[:, -n:]


class _TransLayer(nn.Module):
    def __init__(self, dim: int, exact: bool):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim, dim_head=dim // 8, heads=8, num_landmarks=dim // 2, dropout=0.1, exact=exact)

    def forward(self, x):
        return x + self.attn(self.norm(x))


class _PPEG(nn.Module):
    """Pyramid position encoding: depthwise 7x7 + 5x5 + 3x3 convs over the square token grid."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 7, 1, 3, groups=dim)
        self.proj1 = nn.Conv2d(dim, dim, 5, 1, 2, groups=dim)
        self.proj2 = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x, side: int):
        cls_token, grid = x[:, :1], x[:, 1:].transpose(1, 2).unflatten(2, (side, side))
        grid = self.proj(grid) + grid + self.proj1(grid) + self.proj2(grid)
        return torch.cat([cls_token, grid.flatten(2).transpose(1, 2)], dim=1)


class TransMIL(nn.Module):
    """TransMIL: projection -> square-grid padding (repeating the first instances) -> class token
    -> Nystrom transformer layer -> PPEG -> Nystrom transformer layer -> LayerNorm -> class token
    -> linear head. ``exact_attention=True`` swaps Nystrom for exact attention (documented
    deviation; same parameters)."""

    def __init__(
        self,
        in_dim: int = 1024,
        num_classes: int = 2,
        embed_dim: int = 512,
        act: str = "relu",
        drop_rate: float = 0.25,
        exact_attention: bool = False,
    ):
        super().__init__()
        check_num_classes("TransMIL", num_classes)
        self.in_dim, self.num_classes, self.embed_dim = in_dim, num_classes, embed_dim
        self.num_features = self.head_hidden_size = embed_dim
        self.pretrained_cfg: dict = {}  # filled in by build_model
        self._fc1 = make_projection(in_dim, embed_dim, act, drop_rate, "TransMIL")
        self.pos_layer = _PPEG(embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.layer1 = _TransLayer(embed_dim, exact_attention)
        self.layer2 = _TransLayer(embed_dim, exact_attention)
        self.norm = nn.LayerNorm(embed_dim)
        self.classifier = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.grad_checkpointing = False
        self.apply(_init_official)
        nn.init.normal_(self.cls_token, std=1e-6)

    def _forward_bag(self, x: torch.Tensor) -> torch.Tensor:
        h = self._fc1(x.to(self._fc1[0].weight.dtype))[None]
        n = h.shape[1]
        side = math.ceil(math.sqrt(n))
        h = torch.cat([h, h[:, : side * side - n]], dim=1)
        h = torch.cat([self.cls_token.to(h.dtype), h], dim=1)
        if self.grad_checkpointing and torch.is_grad_enabled():  # recompute each transformer layer in the backward
            h = torch.utils.checkpoint.checkpoint(self.layer1, h, use_reentrant=False)
            h = torch.utils.checkpoint.checkpoint(self.layer2, self.pos_layer(h, side), use_reentrant=False)
        else:
            h = self.layer2(self.pos_layer(self.layer1(h), side))
        return self.norm(h)[:, 0]

    def forward_features(self, bags: Bags, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        x, cu = pack_bags(bags, cu_seqlens, self.in_dim, "TransMIL")
        bounds = cu.tolist()
        return torch.cat([self._forward_bag(x[s:e]) for s, e in zip(bounds, bounds[1:])])

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.classifier(x)

    def forward(self, bags: Bags, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(bags, cu_seqlens))

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"cls_token"}


register_pretrained_cfgs({
    "abmil": dict(
        num_classes=2, license="MIT", source="https://github.com/AMLab-Amsterdam/AttentionDeepMIL",
        paper="Attention-based Deep Multiple Instance Learning (Ilse, Tomczak & Welling, ICML 2018, arXiv:1802.04712)",
        first_conv="feature.0", classifier="classifier.0",
        notes="Gated attention; layer sizes of MambaMIL's models/ABMIL.py (GatedAttention). No pretrained weights.",
    ),
    "abmil_ungated": dict(
        num_classes=2, license="MIT", source="https://github.com/isyangshu/MambaMIL",
        paper="Attention-based Deep Multiple Instance Learning (Ilse, Tomczak & Welling, ICML 2018, arXiv:1802.04712)",
        first_conv="feature.0", classifier="classifier.0",
        notes="Plain tanh attention: the 'att_mil' (DAttention) baseline of MambaMIL's code. No pretrained weights.",
    ),
    "transmil": dict(
        num_classes=2, license="see source", source="https://github.com/szc19990412/TransMIL",
        paper="TransMIL: Transformer based Correlated Multiple Instance Learning for Whole Slide Image "
              "Classification (Shao et al., NeurIPS 2021, arXiv:2106.00908)",
        first_conv="_fc1.0", classifier="classifier",
        notes="Nystrom attention as in MambaMIL's models/TransMIL.py; exact_attention=True swaps in exact "
              "softmax attention. No pretrained weights.",
    ),
})


@register_model
def abmil(pretrained: bool = False, **kwargs) -> ABMIL:
    """Gated-attention MIL: 512-d projection, 128-d gated attention."""
    return build_model(ABMIL, "abmil", pretrained, **{**dict(gated=True), **kwargs})


@register_model
def abmil_ungated(pretrained: bool = False, **kwargs) -> ABMIL:
    """Attention MIL without the gate (DAttention)."""
    return build_model(ABMIL, "abmil_ungated", pretrained, **{**dict(gated=False), **kwargs})


@register_model
def transmil(pretrained: bool = False, **kwargs) -> TransMIL:
    """TransMIL: two Nystrom transformer layers around a PPEG position encoding, width 512."""
    return build_model(TransMIL, "transmil", pretrained, **kwargs)
