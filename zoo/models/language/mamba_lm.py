"""Mamba language models: mamba-ssm's ``MambaLMHeadModel`` (Mamba-1, Mamba-2, and hybrids with attention layers).

The model is configured like mamba-ssm's ``MambaConfig`` (d_model, n_layer, d_intermediate, vocab_size, ssm_cfg
with ``layer`` "Mamba1" / "Mamba2", attn_layer_idx, attn_cfg, rms_norm, residual_in_fp32, fused_add_norm,
pad_vocab_size_multiple, tie_embeddings) and keeps its parameter names (``backbone.embedding``,
``backbone.layers.N.{norm, mixer, norm2, mlp}``, ``backbone.norm_f``, ``lm_head``), so the state-spaces checkpoints
load by name. Checkpoints in the Hugging Face transformers layout (``MambaForCausalLM`` / ``Mamba2ForCausalLM``:
``backbone.embeddings``, tied ``lm_head`` left out) are converted on load by :func:`checkpoint_filter_fn`.

Attention layers are mamba-ssm's MHA (fused qkv ``in_proj``, optional depthwise conv over qkv, rotary embedding on
the first ``rotary_emb_dim`` channels, grouped kv heads, ``out_proj``) through PyTorch's scaled_dot_product_attention.
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from zoo.core.block import add_norm, init_mamba_weights
from zoo.core.checks import check_int, check_sizes
from zoo.core.mamba import Mamba, causal_conv1d, conv_history
from zoo.core.mamba2 import Mamba2
from zoo.core.norm import RMSNorm
from zoo.core.precision import compute_dtype
from zoo.hub import CheckpointError
from zoo.registry import build_model, register_model, register_pretrained_cfgs

from .generation import ByteTokenizer, GenerationMixin

SSM_LAYERS = {"Mamba1": Mamba, "Mamba2": Mamba2}


@dataclass
class MambaConfig:
    """mamba-ssm's ``MambaConfig`` (same fields and defaults); ``config.json`` of a state-spaces checkpoint."""

    d_model: int = 2560
    d_intermediate: int = 0
    n_layer: int = 64
    vocab_size: int = 50277
    ssm_cfg: dict = field(default_factory=dict)
    attn_layer_idx: list = field(default_factory=list)
    attn_cfg: dict = field(default_factory=dict)
    rms_norm: bool = True
    residual_in_fp32: bool = True
    fused_add_norm: bool = True
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = True


# --- attention ------------------------------------------------------------------------------------------

def rotary(x: torch.Tensor, positions: torch.Tensor, dim: int, base: float, interleaved: bool) -> torch.Tensor:
    """Rotary embedding on the first ``dim`` channels of x (..., length, heads, head_dim) at integer ``positions``
    (length,) or (batch, length); GPT-NeoX halves, or adjacent pairs with ``interleaved`` (flash-attn's
    RotaryEmbedding). Angles in float32 as flash-attn (float64 for float64 x)."""
    acc = compute_dtype(x.dtype)
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=x.device, dtype=acc) / dim))
    angles = positions.to(acc)[..., None] * inv_freq  # (..., length, dim / 2)
    cos, sin = angles.cos()[..., None, :].to(x.dtype), angles.sin()[..., None, :].to(x.dtype)
    rot, rest = x[..., :dim], x[..., dim:]
    x1, x2 = (rot[..., 0::2], rot[..., 1::2]) if interleaved else rot.chunk(2, dim=-1)
    o1, o2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    out = torch.stack([o1, o2], dim=-1).flatten(-2) if interleaved else torch.cat([o1, o2], dim=-1)
    return torch.cat([out, rest], dim=-1)


class MHA(nn.Module):
    """mamba-ssm's MHA (causal self-attention of the hybrid LMs) with mamba-ssm's parameter names.

    Decoding keeps a KV cache: ``forward_stream`` (a prompt, or packed prompts) returns the state
    (conv_state or None, kv cache (b, capacity, 2, num_heads_kv, head_dim), lengths (b,)), and ``step`` writes one
    token into it in place at each sequence's own length.
    """

    def __init__(self, embed_dim: int, num_heads: int, num_heads_kv: Optional[int] = None, head_dim: Optional[int] = None,
                 mlp_dim: int = 0, qkv_proj_bias: bool = True, out_proj_bias: bool = True,
                 softmax_scale: Optional[float] = None, causal: bool = False, layer_idx: Optional[int] = None,
                 d_conv: int = 0, rotary_emb_dim: int = 0, rotary_emb_base: float = 10000.0,
                 rotary_emb_interleaved: bool = False, device=None, dtype=None):
        super().__init__()
        check_sizes("MHA", embed_dim=embed_dim, num_heads=num_heads)
        check_int("MHA: d_conv", d_conv, 0)
        check_int("MHA: rotary_emb_dim", rotary_emb_dim, 0)
        check_int("MHA: mlp_dim", mlp_dim, 0)
        self.num_heads_kv = num_heads if num_heads_kv is None else check_int("MHA: num_heads_kv", num_heads_kv, 1)
        if num_heads % self.num_heads_kv:
            raise ValueError(f"MHA: num_heads_kv={self.num_heads_kv} must divide num_heads={num_heads}")
        if head_dim is None and embed_dim % num_heads:
            raise ValueError(f"MHA: num_heads={num_heads} must divide embed_dim={embed_dim} when head_dim is not given")
        self.embed_dim, self.num_heads, self.layer_idx = embed_dim, num_heads, layer_idx
        self.head_dim = head_dim if head_dim is not None else embed_dim // num_heads
        if rotary_emb_dim % 2 or rotary_emb_dim > self.head_dim:
            raise ValueError(f"MHA: rotary_emb_dim must be even and <= head_dim={self.head_dim}, got {rotary_emb_dim}")
        self.causal, self.softmax_scale, self.d_conv = causal, softmax_scale, d_conv
        self.rotary_emb_dim, self.rotary_emb_base, self.rotary_emb_interleaved = rotary_emb_dim, rotary_emb_base, rotary_emb_interleaved
        self.mlp_dim = math.ceil(mlp_dim / 256) * 256  # as mamba-ssm
        factory = {"device": device, "dtype": dtype}
        self.qkv_dim = self.head_dim * (num_heads + 2 * self.num_heads_kv)
        self.in_proj = nn.Linear(embed_dim, self.qkv_dim + self.mlp_dim, bias=qkv_proj_bias, **factory)
        if d_conv > 0:
            self.conv1d = nn.Conv1d(self.qkv_dim, self.qkv_dim, d_conv, padding=d_conv - 1, groups=self.qkv_dim, **factory)
        self.out_proj = nn.Linear(self.head_dim * num_heads + self.mlp_dim // 2, embed_dim, bias=out_proj_bias, **factory)

    def _qkv(self, hidden, cu_seqlens=None):
        """in_proj (+ conv) -> q (b, l, h, d), k and v (b, l, hkv, d), the gated MLP branch (or None), the conv input."""
        qkv = self.in_proj(hidden)
        mlp = None
        if self.mlp_dim:
            qkv, up, gate = qkv.split([self.qkv_dim, self.mlp_dim // 2, self.mlp_dim // 2], dim=-1)
            mlp = up * F.silu(gate)
        conv_in = qkv
        if self.d_conv:
            qkv = causal_conv1d(qkv, self.conv1d.weight, self.conv1d.bias, cu_seqlens=cu_seqlens)
        b, length = qkv.shape[:2]
        q, k, v = qkv.split([self.num_heads * self.head_dim, self.num_heads_kv * self.head_dim,
                             self.num_heads_kv * self.head_dim], dim=-1)
        shape = (b, length, -1, self.head_dim)
        return q.reshape(shape), k.reshape(shape), v.reshape(shape), mlp, conv_in

    def _rotate(self, q, k, positions):
        if not self.rotary_emb_dim:
            return q, k
        args = (positions, self.rotary_emb_dim, self.rotary_emb_base, self.rotary_emb_interleaved)
        return rotary(q, *args), rotary(k, *args)

    def _attend(self, q, k, v, mask=None, is_causal=False):
        """q (b, lq, h, d), k / v (b, lk, hkv, d) -> (b, lq, h * d)."""
        rep = self.num_heads // self.num_heads_kv
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                             is_causal=is_causal, scale=self.softmax_scale)
        return out.transpose(1, 2).flatten(2)

    def _output(self, context, mlp):
        return self.out_proj(context if mlp is None else torch.cat([context, mlp], dim=-1))

    def _check_input(self, hidden, cu_seqlens):
        if hidden.dim() != 3 or hidden.shape[-1] != self.embed_dim:
            raise ValueError(f"MHA: expected input of shape (batch, length, {self.embed_dim}), got {tuple(hidden.shape)}")
        if cu_seqlens is not None and hidden.shape[0] != 1:
            raise ValueError(f"MHA: packed sequences (cu_seqlens) need batch 1, got batch {hidden.shape[0]}")

    def forward(self, hidden: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(batch, length, embed_dim) -> same; ``cu_seqlens``: packed sequences in batch 1, attending only within
        their own sequence (positions restart at each)."""
        return self._full(hidden, cu_seqlens)[0]

    def _full(self, hidden, cu_seqlens):
        self._check_input(hidden, cu_seqlens)
        q, k, v, mlp, conv_in = self._qkv(hidden, cu_seqlens)
        length = hidden.shape[1]
        pos = torch.arange(length, device=hidden.device)
        mask = None
        if cu_seqlens is not None:
            bounds = cu_seqlens.to(device=hidden.device, dtype=torch.long)
            seq = torch.repeat_interleave(torch.arange(bounds.numel() - 1, device=hidden.device), bounds.diff(),
                                          output_size=length)
            pos = pos - bounds[seq]
            mask = seq[:, None] == seq[None, :]
            if self.causal:
                mask = mask & torch.ones(length, length, dtype=torch.bool, device=hidden.device).tril()
        q, k = self._rotate(q, k, pos)
        context = self._attend(q, k, v, mask, is_causal=self.causal and mask is None)
        return self._output(context, mlp), (q, k, v, conv_in)

    def forward_stream(self, hidden: torch.Tensor, state=None, cu_seqlens: Optional[torch.Tensor] = None,
                       capacity: Optional[int] = None):
        """A prompt (b, l, d), or packed prompts with ``cu_seqlens``: returns (output, state) with a KV cache of
        ``capacity`` positions (default: the longest prompt) per sequence. Only a first chunk (state None)."""
        if state is not None:
            raise ValueError("MHA.forward_stream takes the first chunk (a prompt); continue with step()")
        if not self.causal:
            raise ValueError("MHA: a non-causal attention layer cannot decode (causal=False)")
        out, (q, k, v, conv_in) = self._full(hidden, cu_seqlens)
        b, length = hidden.shape[:2]
        if cu_seqlens is None:
            lengths = torch.full((b,), length, dtype=torch.long, device=hidden.device)
            starts = torch.zeros(b, dtype=torch.long, device=hidden.device)
        else:
            bounds = cu_seqlens.to(device=hidden.device, dtype=torch.long)
            starts, lengths = bounds[:-1], bounds.diff()
        longest = int(lengths.max())
        capacity = longest if capacity is None else capacity
        if capacity < longest:
            raise ValueError(f"MHA: KV cache capacity {capacity} is shorter than the longest prompt ({longest} tokens)")
        n = lengths.numel()
        kv = k.new_zeros(n, capacity, 2, self.num_heads_kv, self.head_dim)
        offs = torch.arange(longest, device=hidden.device)
        valid = offs[None] < lengths[:, None]  # (n, longest)
        src = (starts[:, None] + offs[None]).clamp(max=length - 1)  # packed position of each cache slot
        if cu_seqlens is None:
            kv[:, :length, 0], kv[:, :length, 1] = k, v
        else:
            kv[:, :longest, 0] = k[0, src] * valid[..., None, None]
            kv[:, :longest, 1] = v[0, src] * valid[..., None, None]
        conv_state = conv_history(conv_in, self.d_conv, None, cu_seqlens) if self.d_conv else None
        return out, [conv_state, kv, lengths.clone()]

    def step(self, hidden: torch.Tensor, state):
        """One token per sequence (b, 1, d): writes its k, v at each sequence's length into the cache and advances
        the lengths, in place (fixed shapes, so the step can be captured in a CUDA graph). Returns (output, state)."""
        conv_state, kv, lengths = state
        conv_out_state = None
        qkv = self.in_proj(hidden[:, 0])
        mlp = None
        if self.mlp_dim:
            qkv, up, gate = qkv.split([self.qkv_dim, self.mlp_dim // 2, self.mlp_dim // 2], dim=-1)
            mlp = (up * F.silu(gate))[:, None]
        if self.d_conv:
            window = torch.cat([conv_state.to(qkv.dtype), qkv[:, None]], dim=1)
            qkv = (window * self.conv1d.weight[:, 0].t()).sum(1) + (0 if self.conv1d.bias is None else self.conv1d.bias)
            conv_out_state = window[:, 1:]
        b = qkv.shape[0]
        q, k, v = qkv.split([self.num_heads * self.head_dim, self.num_heads_kv * self.head_dim,
                             self.num_heads_kv * self.head_dim], dim=-1)
        q, k, v = (t.reshape(b, 1, -1, self.head_dim) for t in (q, k, v))
        q, k = self._rotate(q, k, lengths[:, None])
        rows = torch.arange(b, device=hidden.device)
        kv[rows, lengths, 0] = k[:, 0].to(kv.dtype)
        kv[rows, lengths, 1] = v[:, 0].to(kv.dtype)
        lengths += 1
        mask = (torch.arange(kv.shape[1], device=hidden.device)[None] < lengths[:, None])[:, None, None, :]
        context = self._attend(q, kv[:, :, 0].to(q.dtype), kv[:, :, 1].to(q.dtype), mask)
        if conv_out_state is not None:
            conv_state.copy_(conv_out_state)
        return self._output(context, mlp), state


class GatedMLP(nn.Module):
    """mamba-ssm's GatedMLP (fc1 -> up * silu(gate) -> fc2), the MLP of blocks when d_intermediate > 0."""

    def __init__(self, in_features: int, hidden_features: int, out_features: Optional[int] = None, bias: bool = False,
                 multiple_of: int = 128, device=None, dtype=None):
        super().__init__()
        hidden = (hidden_features + multiple_of - 1) // multiple_of * multiple_of
        self.fc1 = nn.Linear(in_features, 2 * hidden, bias=bias, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden, out_features or in_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x):
        y, gate = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(y * F.silu(gate))


# --- blocks and the model -------------------------------------------------------------------------------

class LMBlock(nn.Module):
    """mamba-ssm's Block: Add -> Norm -> Mixer (-> Add -> Norm2 -> MLP), the residual stream passed alongside."""

    def __init__(self, mixer: nn.Module, norm: nn.Module, mlp: Optional[nn.Module], norm2: Optional[nn.Module],
                 residual_in_fp32: bool):
        super().__init__()
        self.norm = norm
        self.mixer = mixer
        if mlp is not None:
            self.norm2 = norm2
            self.mlp = mlp
        else:
            self.mlp = None
        self.residual_in_fp32 = residual_in_fp32

    def _mlp(self, hidden, residual):
        if self.mlp is None:
            return hidden, residual
        hidden, residual = add_norm(hidden, residual, self.norm2, residual_in_fp32=self.residual_in_fp32)
        return self.mlp(hidden), residual

    def forward(self, hidden, residual=None, cu_seqlens=None):
        hidden, residual = add_norm(hidden, residual, self.norm, residual_in_fp32=self.residual_in_fp32)
        return self._mlp(self.mixer(hidden, cu_seqlens=cu_seqlens), residual)

    def forward_stream(self, hidden, residual, cu_seqlens=None, capacity=None):
        """The block over a prompt: (hidden, residual, the mixer's decoding state)."""
        hidden, residual = add_norm(hidden, residual, self.norm, residual_in_fp32=self.residual_in_fp32)
        kw = {"capacity": capacity} if isinstance(self.mixer, MHA) else {}
        hidden, state = self.mixer.forward_stream(hidden, cu_seqlens=cu_seqlens, **kw)
        return (*self._mlp(hidden, residual), state)

    def step(self, hidden, residual, state):
        """One token: (hidden, residual); ``state`` (a list) is updated in place."""
        hidden, residual = add_norm(hidden, residual, self.norm, residual_in_fp32=self.residual_in_fp32)
        # The state-space mixers write their new state over the old; attention's cache is updated in place anyway.
        hidden, new = self.mixer.step(hidden, state, **({} if isinstance(self.mixer, MHA) else {"inplace": True}))
        for old, fresh in zip(state, new):
            if old is not None and old is not fresh:
                old.copy_(fresh)
        return self._mlp(hidden, residual)


class MambaLMHeadModel(nn.Module, GenerationMixin):
    """A Mamba language model (mamba-ssm's MambaLMHeadModel): token embedding -> n_layer blocks (Mamba-1, Mamba-2 or
    MHA mixers, optional gated MLP) -> final norm -> lm_head (tied to the embedding by default).

    ``forward(input_ids)`` gives logits (batch, length, vocab) over the padded vocabulary (``vocab_size`` rounded up
    to ``pad_vocab_size_multiple``); ``cu_seqlens`` packs sequences into batch 1. ``generate`` is in
    :mod:`zoo.models.language.generation`. ``fused_add_norm`` is kept for the config's sake: the zoo fuses the add and
    the RMSNorm whenever its kernel applies (CUDA), with the same result.
    """

    def __init__(self, d_model: int = 2560, n_layer: int = 64, d_intermediate: int = 0, vocab_size: int = 50277,
                 ssm_cfg: Optional[dict] = None, attn_layer_idx=(), attn_cfg: Optional[dict] = None,
                 rms_norm: bool = True, residual_in_fp32: bool = True, fused_add_norm: bool = True,
                 pad_vocab_size_multiple: int = 8, tie_embeddings: bool = True, norm_epsilon: float = 1e-5,
                 initializer_range: float = 0.02, device=None, dtype=None):
        super().__init__()
        check_sizes("MambaLMHeadModel", d_model=d_model, n_layer=n_layer, vocab_size=vocab_size,
                    pad_vocab_size_multiple=pad_vocab_size_multiple)
        check_int("MambaLMHeadModel: d_intermediate", d_intermediate, 0)
        ssm_cfg = copy.deepcopy(dict(ssm_cfg or {}))
        layer = ssm_cfg.pop("layer", "Mamba1")
        if layer not in SSM_LAYERS:
            raise ValueError(f"MambaLMHeadModel: ssm_cfg['layer'] must be one of {sorted(SSM_LAYERS)}, got {layer!r}")
        attn_layer_idx = list(attn_layer_idx or [])
        bad = [i for i in attn_layer_idx if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_layer]
        if bad:
            raise ValueError(f"MambaLMHeadModel: attn_layer_idx must hold layer indices in [0, {n_layer}), got {bad}")
        attn_cfg = dict(attn_cfg or {})
        self.config = MambaConfig(d_model, d_intermediate, n_layer, vocab_size, {"layer": layer, **ssm_cfg},
                                  attn_layer_idx, attn_cfg, rms_norm, residual_in_fp32, fused_add_norm,
                                  pad_vocab_size_multiple, tie_embeddings)
        padded = -(-vocab_size // pad_vocab_size_multiple) * pad_vocab_size_multiple
        factory = {"device": device, "dtype": dtype}
        self.d_model = self.num_features = self.head_hidden_size = d_model
        self.vocab_size = vocab_size
        self.num_classes = padded  # timm's name for the head's width
        self.tie_embeddings = tie_embeddings
        self.grad_checkpointing = False

        def norm():
            return RMSNorm(d_model, eps=norm_epsilon, **factory) if rms_norm else nn.LayerNorm(d_model, eps=norm_epsilon, **factory)

        def block(i):
            if i in attn_layer_idx:
                mixer = MHA(d_model, layer_idx=i, **attn_cfg, **factory)
            else:
                mixer = SSM_LAYERS[layer](d_model, layer_idx=i, **ssm_cfg, **factory)
            mlp = GatedMLP(d_model, d_intermediate, d_model, **factory) if d_intermediate else None
            return LMBlock(mixer, norm(), mlp, norm() if mlp is not None else None, residual_in_fp32)

        self.backbone = nn.Module()
        self.backbone.embedding = nn.Embedding(padded, d_model, **factory)
        self.backbone.layers = nn.ModuleList([block(i) for i in range(n_layer)])
        self.backbone.norm_f = norm()
        self.lm_head = nn.Linear(d_model, padded, bias=False, **factory)
        if self.backbone.embedding.weight.device.type != "meta":
            nn.init.normal_(self.backbone.embedding.weight, std=initializer_range)
            self.apply(lambda m: init_mamba_weights(m, n_layer, n_residuals_per_layer=2 if d_intermediate else 1))
        if tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    # --- forward ---

    def _check_ids(self, input_ids: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point \
                or input_ids.dtype == torch.bool or input_ids.is_complex():
            got = f"{tuple(input_ids.shape)} {input_ids.dtype}" if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"{type(self).__name__}: expected input_ids of shape (batch, length) and an integer dtype, got {got}")
        if input_ids.shape[1] == 0:
            raise ValueError(f"{type(self).__name__}: input_ids is empty (length 0); give at least one token")
        rows = self.backbone.embedding.num_embeddings
        if torch.compiler.is_compiling():  # the range check inside the graph (eager reads the values to word it)
            torch._assert_async(((input_ids >= 0) & (input_ids < rows)).all(),
                                f"{type(self).__name__}: token ids must be in [0, {rows}) (the padded vocabulary)")
        elif input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= rows):
            raise ValueError(f"{type(self).__name__}: token ids must be in [0, {rows}) (the padded vocabulary), got ids in "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")
        if cu_seqlens is not None:
            bounds = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else None
            if input_ids.shape[0] != 1 or not bounds or bounds[0] != 0 or bounds[-1] != input_ids.shape[1] \
                    or any(b <= a for a, b in zip(bounds, bounds[1:])):
                raise ValueError(f"{type(self).__name__}: cu_seqlens must be a tensor [0, l1, l1 + l2, ..., length={input_ids.shape[1]}] "
                                 f"of increasing offsets for input_ids of batch 1, got {bounds if bounds is not None else cu_seqlens!r} "
                                 f"for input_ids {tuple(input_ids.shape)}")

    def forward_features(self, input_ids: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(batch, length) token ids -> (batch, length, d_model) after the final norm."""
        self._check_ids(input_ids, cu_seqlens)
        hidden, residual = self.backbone.embedding(input_ids), None
        for block in self.backbone.layers:
            if self.grad_checkpointing and torch.is_grad_enabled():
                hidden, residual = checkpoint(block, hidden, residual, cu_seqlens, use_reentrant=False)
            else:
                hidden, residual = block(hidden, residual, cu_seqlens=cu_seqlens)
        return self._final_norm(hidden, residual)

    def _final_norm(self, hidden, residual):
        return add_norm(hidden, residual, self.backbone.norm_f, residual_in_fp32=self.config.residual_in_fp32)[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.lm_head(x)

    def forward(self, input_ids: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(batch, length) token ids -> logits (batch, length, padded vocab)."""
        return self.forward_head(self.forward_features(input_ids, cu_seqlens))

    # --- timm interface ---

    def get_classifier(self) -> nn.Module:
        return self.lm_head

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh, untied output layer of ``num_classes`` outputs (e.g. another vocabulary's size)."""
        check_int("MambaLMHeadModel: num_classes", num_classes, 1)
        w = self.backbone.embedding.weight
        self.lm_head = nn.Linear(self.d_model, num_classes, bias=False, device=w.device, dtype=w.dtype)
        self.num_classes, self.tie_embeddings = num_classes, False

    @torch.jit.ignore
    def no_weight_decay(self):
        return {n for n, _ in self.named_parameters() if n.endswith((".A_log", ".D", ".dt_bias"))}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r"^backbone\.embedding", blocks=r"^backbone\.layers\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def config_dict(self) -> dict:
        """The configuration as mamba-ssm's ``config.json``."""
        return asdict(self.config)


# --- checkpoints ----------------------------------------------------------------------------------------

# The Hugging Face transformers layout (MambaForCausalLM, Mamba2ForCausalLM) differs from mamba-ssm's by one name.
_HF_RENAMES = {"backbone.embeddings.weight": "backbone.embedding.weight"}
_HF_NAMES = {v: k for k, v in _HF_RENAMES.items()}


def checkpoint_filter_fn(state_dict: dict, model: MambaLMHeadModel) -> dict:
    """A state-spaces (mamba-ssm) or Hugging Face transformers state dict -> the model's.

    transformers names the embedding ``backbone.embeddings`` and leaves a tied ``lm_head.weight`` out of its files;
    every other key is the same in both layouts. Anything else is passed through, so strict loading reports it.
    A tied model refuses a file whose lm_head differs from its embedding (the two are one tensor here).
    """
    out = {_HF_RENAMES.get(k, k): v for k, v in state_dict.items()}
    emb, head = out.get("backbone.embedding.weight"), out.get("lm_head.weight")
    if model.tie_embeddings and emb is not None:
        if head is None:
            out["lm_head.weight"] = emb
        elif head.shape != emb.shape or not torch.equal(head, emb):
            raise CheckpointError("checkpoint has an lm_head.weight that differs from its embedding, but the model ties "
                                  "them (tie_embeddings=True); create the model with tie_embeddings=False")
    return out


# --- folders: mamba-ssm's save_pretrained layout and transformers' ----------------------------------------

def _hf_config(model: MambaLMHeadModel) -> dict:
    """transformers' config.json (MambaConfig / Mamba2Config) of a model it can represent; else a ValueError that
    names what it cannot."""
    cfg = model.config
    mixers = [b.mixer for b in model.backbone.layers]
    problems = [what for what, bad in (
        ("attention layers", bool(cfg.attn_layer_idx)), ("an MLP in the blocks (d_intermediate)", bool(cfg.d_intermediate)),
        ("LayerNorm (rms_norm=False)", not cfg.rms_norm)) if bad]
    m = mixers[0]
    common = dict(hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer, vocab_size=model.backbone.embedding.num_embeddings,
                  layer_norm_epsilon=model.backbone.norm_f.eps, residual_in_fp32=cfg.residual_in_fp32,
                  tie_word_embeddings=model.tie_embeddings, state_size=m.d_state, conv_kernel=m.d_conv, expand=m.expand,
                  use_bias=m.in_proj.bias is not None, use_conv_bias=m.conv1d.bias is not None)
    if isinstance(m, Mamba2):
        problems += [what for what, bad in (
            ("D per channel (D_has_hdim)", m.D_has_hdim), ("an MLP branch in the mixer (d_ssm < d_inner)", bool(m.d_mlp)),
            ("no gated RMSNorm (rmsnorm=False)", not m.rmsnorm), ("norm_before_gate=True", m.rmsnorm and m.norm.norm_before_gate),
            ("negative_eigenvalues", m.negative_eigenvalues), ("an RMSNorm eps other than 1e-5", common["layer_norm_epsilon"] != 1e-5),
        ) if bad]
        out = dict(model_type="mamba2", architectures=["Mamba2ForCausalLM"], num_heads=m.nheads, head_dim=m.headdim,
                   n_groups=m.ngroups, chunk_size=m.chunk_size, time_step_limit=list(m.dt_limit), **common)
    else:
        problems += [what for what, bad in (("negative_eigenvalues", m.negative_eigenvalues),
                                            ("token-dynamics refinements", bool(m.bc_sign or m.reorder_tokens))) if bad]
        out = dict(model_type="mamba", architectures=["MambaForCausalLM"], time_step_rank=m.dt_rank, **common)
    if problems:
        raise ValueError(f"save_pretrained(layout='hf'): transformers' Mamba models cannot represent {', '.join(problems)}")
    return out


def _from_hf_config(hf: dict) -> dict:
    """MambaLMHeadModel arguments of a transformers config.json (model_type "mamba" or "mamba2")."""
    kind = hf.get("model_type")
    if kind not in ("mamba", "mamba2"):
        raise ValueError(f"config.json: model_type must be 'mamba' or 'mamba2' (transformers) or absent (mamba-ssm), got {kind!r}")
    ssm = dict(d_state=hf.get("state_size", 16 if kind == "mamba" else 128), d_conv=hf.get("conv_kernel", 4),
               expand=hf.get("expand", 2), conv_bias=hf.get("use_conv_bias", True), bias=hf.get("use_bias", False))
    if kind == "mamba":
        rank = hf.get("time_step_rank", "auto")
        ssm.update(layer="Mamba1", dt_rank=rank)
    else:
        ssm.update(layer="Mamba2", headdim=hf.get("head_dim", 64), ngroups=hf.get("n_groups", 8),
                   chunk_size=hf.get("chunk_size", 256), dt_limit=tuple(hf.get("time_step_limit", (0.0, float("inf")))))
    return dict(d_model=hf["hidden_size"], n_layer=hf["num_hidden_layers"], vocab_size=hf["vocab_size"], ssm_cfg=ssm,
                residual_in_fp32=hf.get("residual_in_fp32", True), norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
                tie_embeddings=hf.get("tie_word_embeddings", kind == "mamba"), pad_vocab_size_multiple=1)


def save_pretrained(model: MambaLMHeadModel, folder, layout: str = "state_spaces") -> Path:
    """Write ``model`` into ``folder``: ``layout="state_spaces"`` as mamba-ssm's save_pretrained (config.json of its
    MambaConfig + pytorch_model.bin); ``"hf"`` as transformers' save_pretrained (config.json of MambaConfig /
    Mamba2Config + model.safetensors, tied lm_head left out), which ``MambaForCausalLM.from_pretrained`` reads.
    Both read back with :func:`from_pretrained`."""
    from zoo import hub

    if layout not in ("state_spaces", "hf"):
        raise ValueError(f"save_pretrained: layout must be 'state_spaces' or 'hf', got {layout!r}")
    rows = model.backbone.embedding.num_embeddings
    if model.lm_head.out_features != rows:
        raise ValueError(f"save_pretrained: the lm_head has {model.lm_head.out_features} outputs (reset_classifier) but the "
                         f"embedding {rows} rows; neither config format can describe that")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "hf":
        config = _hf_config(model)
        sd = {_HF_NAMES.get(k, k): v for k, v in model.state_dict().items()
              if not (k == "lm_head.weight" and model.tie_embeddings)}
        hub.save_state_dict(sd, folder / "model.safetensors")
    else:
        config = {**model.config_dict(), "tie_embeddings": model.tie_embeddings}
        sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        hub.atomic_write(folder / "pytorch_model.bin", lambda tmp: torch.save(sd, tmp))
    hub.write_text_atomic(folder / "config.json", json.dumps(config, indent=1) + "\n")
    return folder


def from_pretrained(folder, **kwargs) -> MambaLMHeadModel:
    """A model from a folder holding config.json and weights, in mamba-ssm's layout (its MambaConfig;
    pytorch_model.bin) or transformers' (model_type mamba / mamba2; model.safetensors, or shards listed in
    model.safetensors.index.json), loaded strictly. ``kwargs`` override config fields (e.g. ``dtype``)."""
    from zoo import hub

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"from_pretrained: no config.json in {folder}")
    config = json.loads((folder / "config.json").read_text())
    args = _from_hf_config(config) if "model_type" in config else {k: v for k, v in config.items() if k in MambaConfig.__dataclass_fields__}
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [next((n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).is_file()), None)]
        if files[0] is None:
            raise FileNotFoundError(f"from_pretrained: no model.safetensors, pytorch_model.bin or "
                                    f"model.safetensors.index.json in {folder}")
    state_dict = {}
    for name in files:
        state_dict.update(hub.load_checkpoint(folder / name))
    model = MambaLMHeadModel(**{**args, **kwargs})
    hub.load_state_dict(model, checkpoint_filter_fn(state_dict, model), strict=True, source=folder)
    return model


# --- entries --------------------------------------------------------------------------------------------

_PAPER_1 = "Mamba: Linear-Time Sequence Modeling with Selective State Spaces (Gu & Dao, 2023)"
_PAPER_2 = "Transformers are SSMs: Generalized Models and Efficient Algorithms Through Structured State Space Duality (Dao & Gu, ICML 2024)"
_SOURCE = "https://github.com/state-spaces/mamba"
_HEAD_CFG = dict(first_conv="backbone.embedding", classifier="lm_head")
_NOTES = ("Trained on 300B tokens of the Pile by the Mamba authors; GPT-NeoX tokenizer (EleutherAI/gpt-neox-20b). "
          "Weights are the official ones, unchanged.")

# name -> (state-spaces repository, d_model, n_layer, config extras)
_MAMBA2_CFG = dict(ssm_cfg={"layer": "Mamba2"}, pad_vocab_size_multiple=16)
_ARCHS = {
    "mamba_130m": ("mamba-130m", 768, 24, {}),
    "mamba_370m": ("mamba-370m", 1024, 48, {}),
    "mamba_790m": ("mamba-790m", 1536, 48, {}),
    "mamba_1_4b": ("mamba-1.4b", 2048, 48, {}),
    "mamba_2_8b": ("mamba-2.8b", 2560, 64, {}),
    "mamba2_130m": ("mamba2-130m", 768, 24, _MAMBA2_CFG),
    "mamba2_370m": ("mamba2-370m", 1024, 48, _MAMBA2_CFG),
    "mamba2_780m": ("mamba2-780m", 1536, 48, _MAMBA2_CFG),
    "mamba2_1_3b": ("mamba2-1.3b", 2048, 48, _MAMBA2_CFG),
    "mamba2_2_7b": ("mamba2-2.7b", 2560, 64, _MAMBA2_CFG),
    "mamba2attn_2_7b": ("mamba2attn-2.7b", 2560, 64, dict(
        _MAMBA2_CFG, attn_layer_idx=[9, 18, 27, 36, 45, 56],
        attn_cfg=dict(causal=True, d_conv=4, head_dim=128, num_heads=30, out_proj_bias=False, qkv_proj_bias=False,
                      rotary_emb_dim=64))),
}
# Hugging Face transformers conversions of the Mamba-1 models published by state-spaces as single files.
_HF_REPOS = {"mamba_130m", "mamba_370m", "mamba_790m"}


# Small byte-level LMs of our own (vocabulary: the 256 byte values, zoo.models.language.ByteTokenizer), the size that
# trains in minutes on one GPU (benchmarks/train_lm.py): d_model 256, 8 layers, about 3.5M parameters. The Mamba-2
# mixer keeps headdim 64 (8 heads) and takes d_state 64, which gives it the Mamba-1 model's parameter count.
# name -> (mixer, MambaConfig fields)
_BYTE_ARCHS = {
    "mamba_tiny_lm": ("Mamba", dict(d_model=256, n_layer=8, ssm_cfg={"layer": "Mamba1"})),
    "mamba2_tiny_lm": ("Mamba-2", dict(d_model=256, n_layer=8, ssm_cfg={"layer": "Mamba2", "d_state": 64, "headdim": 64})),
}
BYTE_VOCAB = 256


def model_config(name: str) -> dict:
    """The MambaConfig of an entry, every field (as its state-spaces config.json gives them)."""
    if name in _BYTE_ARCHS:
        return asdict(MambaConfig(vocab_size=BYTE_VOCAB, **copy.deepcopy(_BYTE_ARCHS[name][1])))
    _, d_model, n_layer, extra = _ARCHS[name]
    return asdict(MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=50277, **copy.deepcopy(extra)))


def entry_tokenizer(name: str) -> Optional[str]:
    """The tokenizer an entry's weights go with, as :func:`load_tokenizer` takes it, when the entry fixes one:
    ``"bytes"`` for the byte-level entries; None for the GPT-NeoX ones (their tokenizer comes from the Hub)."""
    from zoo.registry import split_model_name

    return "bytes" if split_model_name(name)[0] in _BYTE_ARCHS else None


def _cfg(name: str, repo: str, filename: str) -> dict:
    return dict(hf_hub_id=f"state-spaces/{repo}", hf_hub_filename=filename, license="Apache-2.0",
                paper=_PAPER_2 if name.startswith("mamba2") else _PAPER_1, source=_SOURCE, notes=_NOTES, **_HEAD_CFG)


register_pretrained_cfgs({f"{name}.state_spaces": _cfg(name, repo, "pytorch_model.bin") for name, (repo, *_) in _ARCHS.items()})
register_pretrained_cfgs({f"{name}.hf": _cfg(name, _ARCHS[name][0] + "-hf", "model.safetensors") for name in sorted(_HF_REPOS)})


def _create(name: str, pretrained: bool, kwargs: dict) -> MambaLMHeadModel:
    return build_model(MambaLMHeadModel, name, pretrained, checkpoint_filter_fn=checkpoint_filter_fn,
                       **{**model_config(name), **kwargs})


# Registry names cannot hold a "." (it starts a pretrained tag): "1.4b" is spelled "1_4b" (mamba_1_4b).
def _entry(name: str, doc: str):
    def entrypoint(pretrained: bool = False, **kwargs) -> MambaLMHeadModel:
        return _create(name, pretrained, kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = doc
    return register_model(entrypoint)


for _name, (_repo, _d, _n, _extra) in _ARCHS.items():
    _kind = "Mamba-2 + attention" if "attn" in _name else ("Mamba-2" if _name.startswith("mamba2") else "Mamba")
    _entry(_name, f"{_kind} LM (state-spaces/{_repo}): d_model {_d}, {_n} layers, GPT-NeoX vocabulary.")


def _byte_cfg(name: str, **extra) -> dict:
    return dict(license="Apache-2.0", paper=_PAPER_2 if name.startswith("mamba2") else _PAPER_1, source="mamba-zoo",
                notes="Byte-level (vocabulary 256: UTF-8 bytes, ByteTokenizer); trained here by benchmarks/train_lm.py.",
                **_HEAD_CFG, **extra)


# Trained on the King James Bible by benchmarks/train_lm.py (recipes: configs/pretrained/<tag>.yaml; packaged by
# `python benchmarks/train_lm.py ship RUN_DIR`).
register_pretrained_cfgs({
    "mamba_tiny_lm.kjv": _byte_cfg("mamba_tiny_lm", file="weights/mamba_tiny_lm.kjv.safetensors",
                                   sha256="d10b09e97a9e475bd103d5c4ed18227ee5964beb0a0819fc8c6cbb69f58bf1e5"),
    "mamba2_tiny_lm.kjv": _byte_cfg("mamba2_tiny_lm", file="weights/mamba2_tiny_lm.kjv.safetensors",
                                    sha256="97ad263a1b65d2221fc8688f0e04f102feffb47653cb6e3bd6eadc96605b629a"),
})


def _byte_entry(name: str, doc: str):
    def entrypoint(pretrained: bool = False, **kwargs) -> MambaLMHeadModel:
        model = _create(name, pretrained, kwargs)
        model.tokenizer = ByteTokenizer()  # generate("text") needs no tokenizer argument
        return model

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = doc
    return register_model(entrypoint)


for _name, (_kind, _fields) in _BYTE_ARCHS.items():
    _byte_entry(_name, f"{_kind} byte-level LM (mamba-zoo): d_model {_fields['d_model']}, {_fields['n_layer']} layers, "
                       f"vocabulary of the 256 byte values (ByteTokenizer). Weights: trained here (benchmarks/train_lm.py).")
