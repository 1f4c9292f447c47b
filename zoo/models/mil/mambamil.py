"""MambaMIL (Yang, Wang & Chen, MICCAI 2024, arXiv:2403.06800): Mamba layers over the bag of
instance features of a whole-slide image, then gated-free attention pooling and a linear head.

Architecture, as in isyangshu/MambaMIL ``models/MambaMIL.py``:
``_fc1`` (Linear in_dim -> 512, GELU, Dropout) -> ``layers``: depth x [LayerNorm -> mixer, +
residual] -> ``norm`` (LayerNorm) -> ``attention`` (Linear 512 -> 128, Tanh, Linear 128 -> 1),
softmax over the bag -> weighted sum -> ``classifier``. Survival models use the same head with one
logit per time bin: hazards = sigmoid(logits), S = cumprod(1 - hazards).

The mixer is SR-Mamba (sequence reordering), plain Mamba or Vim's BiMamba. SR-Mamba runs one Mamba
direction over the bag in its order and a second one (``*_b`` parameters) over the bag reordered
with stride ``rate``: the bag is zero-padded to a multiple of ``rate`` and read column by column as
a (n / rate, rate) grid, i.e. instances 0, r, 2r, ..., then 1, r + 1, ... The second output is put
back in the original order and the two are summed before ``out_proj``. The padding happens after
``in_proj`` (x and z are zero there), exactly as the official fused path does.

Parameter names equal the official ones, so a state dict saved by the official training code
(``s_{fold}_checkpoint.pt``) loads as is (``checkpoint_filter_fn`` strips DataParallel prefixes).

Bags of any size: a batch of bags is packed into one sequence with ``cu_seqlens`` and runs through
the core in one call per layer; the conv and the scan restart at each bag boundary, and reordering
is done per bag, so the result equals running each bag alone.

Precision, as the official code: the residual stream in the input dtype (x + mixer(LayerNorm(x)), no
residual_in_fp32), the mixers' A, D and dt bias in float32. One difference: under CUDA autocast the attention
softmax and the pooling run in float32 (exp autocasts to float32); the official softmax + bmm pools in the
autocast dtype. The official code trains without autocast, in float32, where the two agree.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from zoo.core import Mamba
from zoo.core.mixers import MIXERS as CORE_MIXERS
from zoo.core.mixers import check_mixer, create_mixer
from zoo.core.shuffle import layer_shuffle_rates, shuffled
from zoo.core.checks import check_num_classes, check_rates, check_sizes
from zoo.registry import build_model, register_model, register_pretrained_cfgs

from .bags import Bags, attention_pool, bag_ids, pack_bags

__all__ = ["SRMamba", "MambaMIL", "reorder_index", "checkpoint_filter_fn"]


def reorder_index(cu_seqlens: torch.Tensor, rate: int):
    """Index maps for SR-Mamba's per-bag stride-``rate`` reordering of packed bags.

    Bag i of n_i instances becomes n_i padded up to K_i * rate (K_i = ceil(n_i / rate)); its
    reordered position q reads instance (q mod K_i) * rate + q // K_i, or a zero pad row.

    Returns ``gather`` (total_padded,) indices into the packed instances, where the value
    ``total`` stands for the zero pad row; ``scatter`` (total,) the reordered position of every
    instance; and ``cu_padded`` the bag boundaries of the reordered sequence.
    """
    if rate < 1:
        raise ValueError(f"SRMamba: rate must be a positive integer, got {rate}")
    cu = cu_seqlens.long()
    lens = cu[1:] - cu[:-1]
    cols = (lens + rate - 1) // rate
    cu_padded = torch.cat([cu.new_zeros(1), (cols * rate).cumsum(0)])
    total, total_padded = int(cu[-1]), int(cu_padded[-1])
    seg = bag_ids(cu_padded, total_padded)
    q = torch.arange(total_padded, device=cu.device) - cu_padded[:-1][seg]
    src = (q % cols[seg]) * rate + q // cols[seg]
    gather = torch.where(src < lens[seg], cu[:-1][seg] + src, torch.full_like(src, total))
    ids = bag_ids(cu, total)
    j = torch.arange(total, device=cu.device) - cu[:-1][ids]
    scatter = cu_padded[:-1][ids] + (j % rate) * cols[ids] + j // rate
    return gather, scatter, cu_padded


class SRMamba(Mamba):
    """Sequence-reordering Mamba: a forward Mamba over the sequence plus a second direction
    (``conv1d_b``, ``x_proj_b``, ``dt_proj_b``, ``A_b_log``, ``D_b``) over its stride-``rate``
    reordering; outputs summed (not averaged) before ``out_proj``, as in the official module."""

    def __init__(self, d_model: int, *args, rate: int = 10, conv_bias: bool = True, device=None, dtype=None, **kwargs):
        super().__init__(d_model, *args, conv_bias=conv_bias, device=device, dtype=dtype, **kwargs)
        if int(rate) < 1:
            raise ValueError(f"SRMamba: rate must be a positive integer, got {rate}")
        self.rate = int(rate)
        self._add_direction("_b", conv_bias, {"device": device, "dtype": dtype})

    def forward(self, hidden: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(batch, length, d_model) -> same; ``cu_seqlens``: packed sequences in batch 1, each
        reordered on its own."""
        self._check_input(hidden, cu_seqlens)
        b, n, _ = hidden.shape
        x, z = self.in_proj(hidden).chunk(2, dim=-1)
        y = self._scan_direction(x, z, cu_seqlens=cu_seqlens)
        if cu_seqlens is None:
            # Rows of one length n: the reordering is a reshape of each row zero-padded to K * rate (K = ceil(n /
            # rate)), position r * K + k reading instance k * rate + r: the same as reorder_index, with shapes
            # that do not depend on values.
            k = -(-n // self.rate)
            order = lambda t: F.pad(t, (0, 0, 0, k * self.rate - n)).reshape(b, k, self.rate, -1).transpose(1, 2)  # noqa: E731
            y_b = self._scan_direction(order(x).reshape(b, k * self.rate, -1), order(z).reshape(b, k * self.rate, -1),
                                       suffix="_b")
            y_b = y_b.reshape(b, self.rate, k, -1).transpose(1, 2).reshape(b, k * self.rate, -1)[:, :n]
            return self.out_proj(y + y_b)
        gather, scatter, cu_padded = reorder_index(cu_seqlens, self.rate)
        # Rows of the batch are flattened into one packed sequence; a zero row serves as padding.
        flat = lambda t: F.pad(t.reshape(1, b * n, -1), (0, 0, 0, 1))[:, gather]  # noqa: E731
        one_seq = cu_padded.numel() == 2  # a single sequence needs no boundary handling
        y_b = self._scan_direction(flat(x), flat(z), suffix="_b", cu_seqlens=None if one_seq else cu_padded)
        y = y + y_b[:, scatter].reshape(b, n, -1)
        return self.out_proj(y)

    def forward_stream(self, hidden, state=None):
        raise NotImplementedError("SRMamba cannot stream: its reordered scan needs the whole sequence")


class _PreNormMixer(nn.Sequential):
    """LayerNorm -> mixer, kept as a Sequential so parameters are named ``layers.i.0`` /
    ``layers.i.1`` like the official model; forwards ``cu_seqlens`` to the mixer."""

    def forward(self, h: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self[1](self[0](h), cu_seqlens=cu_seqlens)


_ACTS = {"relu": nn.ReLU, "gelu": nn.GELU}
MIXERS = ("srmamba", *CORE_MIXERS)  # SR-Mamba, or any core mixer by name (the official: mamba, bimamba)


def _init_official(module: nn.Module) -> None:
    """The official ``initialize_weights``, applied to every module (the mixers included, so
    their dt_proj biases become 0 too): Xavier-normal Linear weights, zero biases, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_normal_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _make_act(act: str, who: str) -> nn.Module:
    if act.lower() not in _ACTS:
        raise ValueError(f"{who}: act must be one of {sorted(_ACTS)}, got {act!r}")
    return _ACTS[act.lower()]()


def make_projection(in_dim: int, embed_dim: int, act: str, drop_rate: float, who: str) -> nn.Sequential:
    """The instance projection shared by the MIL models: Linear -> act (-> Dropout). Checks the sizes and the rate."""
    check_sizes(who, in_dim=in_dim, embed_dim=embed_dim)
    check_rates(who, drop_rate=drop_rate)
    layers = [nn.Linear(in_dim, embed_dim), _make_act(act, who)]
    if drop_rate:
        layers.append(nn.Dropout(drop_rate))
    return nn.Sequential(*layers)


class MambaMIL(nn.Module):
    """MambaMIL for slide classification (``num_classes`` classes) or discrete-time survival
    (``num_classes`` time bins; see :mod:`zoo.models.mil.survival`).

    Input: one bag (n, in_dim), equal-size bags (b, n, in_dim), a list of (n_i, in_dim) bags, or
    a packed (total, in_dim) tensor with ``cu_seqlens``. Output: logits (num_bags, num_classes).
    """

    def __init__(
        self,
        in_dim: int = 1024,
        num_classes: int = 2,
        embed_dim: int = 512,
        depth: int = 2,
        mixer: str = "srmamba",
        rate: int = 10,
        d_state: int = 16,
        d_conv: int = 4,
        expand: float = 2,
        act: str = "gelu",
        drop_rate: float = 0.25,
        attn_dim: int = 128,
        mixer_cfg: Optional[dict] = None,
        layer_shuffle: float = 0.0,
    ):
        """``layer_shuffle``: the last layer's probability of the stochastic layer-wise shuffle of each bag's
        instances in training (ShuffleMamba, ``zoo.core.shuffle``; 0: off)."""
        super().__init__()
        check_mixer("MambaMIL", mixer, MIXERS)
        check_num_classes("MambaMIL", num_classes)
        check_sizes("MambaMIL", depth=depth, attn_dim=attn_dim)
        self.in_dim, self.num_classes, self.embed_dim = in_dim, num_classes, embed_dim
        self.num_features = self.head_hidden_size = embed_dim
        self.mixer, self.rate = mixer, rate
        self.pretrained_cfg: dict = {}  # filled in by build_model
        self._fc1 = make_projection(in_dim, embed_dim, act, drop_rate, "MambaMIL")
        if mixer == "srmamba":
            make = lambda: SRMamba(embed_dim, rate=rate, d_state=d_state, d_conv=d_conv, expand=expand,  # noqa: E731
                                   **(mixer_cfg or {}))
        else:  # the official BiMamba sums both directions (no halving)
            make = lambda: create_mixer(mixer, embed_dim, d_state, d_conv, expand, divide_out=False,  # noqa: E731
                                        mixer_cfg=mixer_cfg)
        self.layers = nn.ModuleList([_PreNormMixer(nn.LayerNorm(embed_dim), make()) for _ in range(depth)])
        self.shuffle_rates = layer_shuffle_rates(depth, layer_shuffle)
        self.norm = nn.LayerNorm(embed_dim)
        self.attention = nn.Sequential(nn.Linear(embed_dim, attn_dim), nn.Tanh(), nn.Linear(attn_dim, 1))
        self.classifier = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.grad_checkpointing = False
        self.apply(_init_official)

    def forward_instances(self, bags: Bags, cu_seqlens: Optional[torch.Tensor] = None):
        """Instance features after the Mamba layers and the final norm: ((total, embed_dim), cu_seqlens)."""
        x, cu = pack_bags(bags, cu_seqlens, self.in_dim, "MambaMIL")
        h = self._fc1(x.to(self._fc1[0].weight.dtype))
        if torch.is_tensor(bags) and bags.dim() == 3 and cu_seqlens is None:
            # Equal-size bags (b, n, feat): the layers run on the batch as it is, not packed (shapes that do not
            # depend on values: one torch.compile graph)
            h, packed = h.reshape(*bags.shape[:2], -1), None
        else:
            h, packed = h[None], (cu if cu.numel() > 2 else None)  # one bag: the plain (faster) path
        for layer, prob in zip(self.layers, self.shuffle_rates):
            if self.grad_checkpointing and torch.is_grad_enabled():
                run = lambda t, layer=layer: torch.utils.checkpoint.checkpoint(layer, t, packed, use_reentrant=False)  # noqa: E731
            else:
                run = lambda t, layer=layer: layer(t, cu_seqlens=packed)  # noqa: E731
            h = h + shuffled(run, h, prob=prob, training=self.training, cu_seqlens=packed)
        return self.norm(h.reshape(-1, h.shape[-1])), cu

    def forward_features(self, bags: Bags, cu_seqlens: Optional[torch.Tensor] = None, return_attention: bool = False):
        """Attention-pooled bag embeddings (num_bags, embed_dim) [, attention weights (total,)]."""
        h, cu = self.forward_instances(bags, cu_seqlens)
        pooled, weights = attention_pool(self.attention(h)[:, 0], h, cu)
        return (pooled, weights) if return_attention else pooled

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
        return {n for n, p in self.named_parameters() if getattr(p, "_no_weight_decay", False)}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return {"stem": r"^_fc1", "blocks": r"^layers\.(\d+)"}


def checkpoint_filter_fn(state_dict: dict, model: Optional[nn.Module] = None) -> dict:
    """Official MambaMIL checkpoints use our names; strip DataParallel / DDP ``module.`` prefixes."""
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}


_SOURCE = "https://github.com/isyangshu/MambaMIL"
_PAPER = ("MambaMIL: Enhancing Long Sequence Modeling with Sequence Reordering in Computational Pathology "
          "(Yang, Wang & Chen, MICCAI 2024, arXiv:2403.06800)")
_NO_WEIGHTS = ("No official checkpoint is released (the README gives training scripts only); entries build the "
               "architecture of the official scripts for training on bag features.")

# The modules timm adapts when it loads weights into another in_chans / num_classes.
_HEAD_CFG = dict(first_conv="_fc1.0", classifier="classifier")

register_pretrained_cfgs({
    "mambamil": dict(
        num_classes=2, license="MIT (code; README: non-commercial academic use)", paper=_PAPER, source=_SOURCE, **_HEAD_CFG,
        notes="SR-Mamba, 2 layers, rate 5 (train_scripts/*.sh), 1024-d ResNet-50 (CLAM) features. " + _NO_WEIGHTS,
    ),
    "mambamil_survival": dict(
        num_classes=4, license="MIT (code; README: non-commercial academic use)", paper=_PAPER, source=_SOURCE, **_HEAD_CFG,
        notes="4 discrete time bins (main_survival.py), NLL survival loss; SR-Mamba rate 5. " + _NO_WEIGHTS,
    ),
    "mambamil_mamba": dict(
        num_classes=2, license="MIT (code; README: non-commercial academic use)", paper=_PAPER, source=_SOURCE, **_HEAD_CFG,
        notes="Ablation: plain (causal) Mamba layers, --mambamil_type Mamba. " + _NO_WEIGHTS,
    ),
    "mambamil_bimamba": dict(
        num_classes=2, license="MIT (code; README: non-commercial academic use)", paper=_PAPER, source=_SOURCE, **_HEAD_CFG,
        notes="Ablation: Vim-style bidirectional Mamba layers, --mambamil_type BiMamba. " + _NO_WEIGHTS,
    ),
})

# Trained here (configs/pretrained/mambamil.digit_bags.yaml: `zoo mil bench --models mambamil --seeds 0`); float16
# package data. The bare "mambamil" cfg above stays the arch's default (the official architecture, no weights).
register_pretrained_cfgs({
    "mambamil.digit_bags": dict(
        file="weights/mambamil.digit_bags.safetensors",
        sha256="3a767d9e1763870702a6b68007928971e5d67f1681b813373e36727b9e6d679d",
        num_classes=2, input_size=(None, 64), license="Apache-2.0 (weights trained by mamba-zoo)", paper=_PAPER,
        source="mamba-zoo", **_HEAD_CFG,
        model_kwargs=dict(in_dim=64, embed_dim=64, num_classes=2, drop_rate=0.25),
        notes="Trained on digit bags (zoo.data.digit_bags: bags of 8-48 scikit-learn digits as 64-d pixel "
              "instances, positive iff the bag holds a 9), SR-Mamba rate 5, 10 epochs.",
    ),
})


def _create(variant: str, pretrained: bool, cfg: dict, kwargs: dict) -> MambaMIL:
    return build_model(MambaMIL, variant, pretrained, checkpoint_filter_fn=checkpoint_filter_fn, **{**cfg, **kwargs})


@register_model
def mambamil(pretrained: bool = False, **kwargs) -> MambaMIL:
    """MambaMIL with SR-Mamba (rate 5), 2 layers of width 512, 1024-d instance features."""
    return _create("mambamil", pretrained, dict(mixer="srmamba", rate=5), kwargs)


@register_model
def mambamil_survival(pretrained: bool = False, **kwargs) -> MambaMIL:
    """MambaMIL for survival: one hazard logit per time bin (4 bins, as in the official scripts)."""
    return _create("mambamil_survival", pretrained, dict(mixer="srmamba", rate=5, num_classes=4), kwargs)


@register_model
def mambamil_mamba(pretrained: bool = False, **kwargs) -> MambaMIL:
    """MambaMIL with plain Mamba layers (no reordering)."""
    return _create("mambamil_mamba", pretrained, dict(mixer="mamba"), kwargs)


@register_model
def mambamil_bimamba(pretrained: bool = False, **kwargs) -> MambaMIL:
    """MambaMIL with bidirectional (forward + backward) Mamba layers."""
    return _create("mambamil_bimamba", pretrained, dict(mixer="bimamba"), kwargs)
