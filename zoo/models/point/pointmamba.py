"""PointMamba (Liang et al., NeurIPS 2024): point patches, serialized by two space-filling curves,
read by a plain stack of Mamba blocks.

Pipeline (LMD0311/PointMamba, models/point_mamba_scan.py, the March 2025 code of the NeurIPS paper):
FPS picks ``num_group`` centres, each takes its ``group_size`` nearest points (relative to the
centre), a mini-PointNet embeds every patch, an MLP embeds every centre as its position. The
tokens are serialized twice, along the Hilbert and the Trans-Hilbert curve of the centres (grid
0.02); each copy gets its order indicator (a learned per-channel scale and shift) and the two are
concatenated into one sequence of 2G tokens, plus positions, through ``depth`` Mamba blocks and a
final norm; the classifier reads the mean token.

Module and parameter names follow the official code (``encoder.first_conv``, ``pos_embed``,
``blocks.layers.{i}.mixer``, ``blocks.layers.{i}.norm``, ``blocks.norm_f``, ``cls_head_finetune``,
``OrderScale_gamma_1`` ...), so official checkpoints load by name after
:func:`checkpoint_filter_fn` strips their wrappers.

Also here: the serialization-based masked point modelling objective (:class:`PointMambaMPM`,
the official pre-training model) and a part-segmentation head (:class:`PointMambaPartSeg`).

Differences from the official code. None changes the weights or the checkpoint layout; the first
two can, rarely, change which centres or which token order a cloud gets:
FPS/kNN run in torch (no pointnet2_ops / KNN_CUDA; pointnet2's CUDA FPS never picks a point with
|p|^2 <= 1e-3 after the first, ours has no such exclusion); the Hilbert depth is taken per cloud
rather than over the batch (equal whenever the clouds of a batch span the same power of two of
grid cells, and batch-independent); the official block (x + mixer(norm(x))) runs in mamba-ssm's
Add -> Norm -> Mixer form, which computes the same thing.

Precision, as the official configuration (mamba-ssm's residual_in_fp32 and fused_add_norm left False,
LayerNorm): the residual stream stays in the input dtype, each norm reads it in its weight's dtype, the
mixers take A, D and the dt bias in float32, FPS measures distances in float32 as pointnet2_ops' kernel
(float64 clouds in float64). No known difference; the official code trains without autocast.
"""
from __future__ import annotations

from functools import partial
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import nn

from zoo.core import ResidualBlock, RMSNorm, init_mamba_weights
from zoo.core.mixers import check_mixer, create_mixer
from zoo.core.shuffle import layer_shuffle_rates, shuffled
from zoo.core.checks import check_float, check_num_classes, check_rates, check_sizes
from zoo.core.precision import upcast
from zoo.registry import build_model, register_model, register_pretrained_cfgs

from .ops import check_head_batch, group_points, knn
from .serialization import check_points, gather_points, serialize

_PAPER = "PointMamba: A Simple State Space Model for Point Cloud Analysis (Liang et al., NeurIPS 2024, arXiv:2402.10739)"
_SOURCE = "https://github.com/LMD0311/PointMamba"
_RELEASE = "https://github.com/LMD0311/PointMamba/releases/download/ckpts-2/"


class PatchEncoder(nn.Module):
    """Mini-PointNet of Point-BERT / Point-MAE: per-point MLP, max-pool, concat the pooled
    feature back onto every point, second MLP, max-pool: (B, G, K, 3) -> (B, G, C)."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.encoder_channel = embed_dim
        self.first_conv = nn.Sequential(nn.Conv1d(3, 128, 1), nn.BatchNorm1d(128), nn.ReLU(inplace=True), nn.Conv1d(128, 256, 1))
        self.second_conv = nn.Sequential(
            nn.Conv1d(512, 512, 1), nn.BatchNorm1d(512), nn.ReLU(inplace=True), nn.Conv1d(512, embed_dim, 1)
        )

    def forward(self, groups: torch.Tensor) -> torch.Tensor:
        b, g, k, _ = groups.shape
        x = self.first_conv(groups.reshape(b * g, k, 3).transpose(1, 2))
        pooled = x.amax(dim=2, keepdim=True)
        x = self.second_conv(torch.cat([pooled.expand(-1, -1, k), x], dim=1))
        return x.amax(dim=2).reshape(b, g, self.encoder_channel)


class MambaEncoder(nn.Module):
    """The official ``MixerModel``: positions added once, ``depth`` pre-norm Mamba blocks, final
    norm. Drop-path rates follow the official ones: block i's rate applies to block i's mixer
    output, which the Add -> Norm -> Mixer form adds at the start of block i + 1 (or at the end).
    The residual stream stays in the input dtype (the official block is x + mixer(norm(x)), with
    mamba-ssm's residual_in_fp32 left False), and the final norm's input is cast to its weight dtype."""

    def __init__(self, dim: int, depth: int, drop_path: Sequence[float], rms_norm: bool = False, ssm_cfg: Optional[dict] = None,
                 mixer: str = "mamba", layer_shuffle: float = 0.0):
        super().__init__()
        self.shuffle_rates = layer_shuffle_rates(depth, layer_shuffle)
        norm = partial(RMSNorm, eps=1e-5) if rms_norm else partial(nn.LayerNorm, eps=1e-5)
        rates = [0.0] + list(drop_path[:-1])
        self.layers = nn.ModuleList([
            ResidualBlock(dim, create_mixer(mixer, dim, 16, 4, 2, layer_idx=i, mixer_cfg=ssm_cfg), norm(dim),
                          drop_path=rates[i], residual_in_fp32=False)
            for i in range(depth)
        ])
        self.drop_path_f = DropPath(drop_path[-1]) if depth and drop_path[-1] > 0 else nn.Identity()
        self.norm_f = norm(dim)
        self.apply(partial(init_mamba_weights, n_layer=depth))
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.forward_intermediates(x, pos, [len(self.layers) - 1])[0]

    def forward_intermediates(self, x: torch.Tensor, pos: torch.Tensor, indices: Sequence[int]) -> List[torch.Tensor]:
        """norm_f of the residual stream after each block in ``indices`` (the last one: the output)."""
        bad = [i for i in indices if not 0 <= i < len(self.layers)]
        if bad:
            raise ValueError(f"MambaEncoder: block indices must lie in [0, {len(self.layers)}), got {bad}")
        hidden, residual, out = x + pos, None, []
        for i, layer in enumerate(self.layers):
            if self.grad_checkpointing and self.training:
                run = partial(torch.utils.checkpoint.checkpoint, layer, use_reentrant=False)
            else:
                run = layer
            hidden, residual = shuffled(run, hidden, residual, prob=self.shuffle_rates[i], training=self.training)
            if i in indices:
                stream = hidden if residual is None else residual + self.drop_path_f(hidden)
                out.append(self.norm_f(stream.to(self.norm_f.weight.dtype)))
        return out


def _order_scale(dim: int):
    gamma = nn.Parameter(torch.empty(dim).normal_(1.0, 0.02))
    beta = nn.Parameter(torch.empty(dim).normal_(0.0, 0.02))
    return gamma, beta


class PointMamba(nn.Module):
    """PointMamba classifier on raw xyz (B, N, 3), any N >= max(num_group, group_size).

    ``lengths`` (B,) marks padded clouds (points beyond a cloud's length are ignored).
    """

    def __init__(
        self,
        num_classes: int = 40,
        trans_dim: int = 384,
        depth: int = 12,
        num_group: int = 64,
        group_size: int = 32,
        encoder_dims: Optional[int] = None,
        drop_path_rate: float = 0.1,
        rms_norm: bool = False,
        global_pool: str = "avg",
        orders: Sequence[str] = ("hilbert", "hilbert-trans"),
        grid_size: float = 0.02,
        head_hidden: int = 256,
        head_drop: float = 0.5,
        ssm_cfg: Optional[dict] = None,
        mixer: str = "mamba",
        layer_shuffle: float = 0.0,
    ):
        """``mixer``: the blocks' mixer by name (``zoo.core.mixers.MIXERS``; the official "mamba", or "mamba2",
        "hydra", ...); ``ssm_cfg``: its arguments (the official name). ``layer_shuffle``: the last block's
        probability of the stochastic layer-wise shuffle of the patch tokens in training (ShuffleMamba,
        ``zoo.core.shuffle``; 0: off)."""
        super().__init__()
        if global_pool not in ("avg", "max", "avg_max"):
            raise ValueError(f"PointMamba: global_pool must be 'avg', 'max' or 'avg_max', got {global_pool!r}")
        check_sizes("PointMamba", trans_dim=trans_dim, depth=depth, num_group=num_group, group_size=group_size,
                    head_hidden=head_hidden)
        check_num_classes("PointMamba", num_classes)
        check_rates("PointMamba", drop_path_rate=drop_path_rate, head_drop=head_drop)
        check_float("PointMamba: grid_size", grid_size, 0, low_open=True)
        encoder_dims = encoder_dims or trans_dim
        if encoder_dims != trans_dim:
            raise ValueError(f"PointMamba: encoder_dims must equal trans_dim (tokens enter the blocks as they are), got {encoder_dims} and {trans_dim}")
        self.num_classes = num_classes
        self.trans_dim = self.num_features = self.embed_dim = trans_dim
        self.num_group, self.group_size = num_group, group_size
        self.orders, self.grid_size = tuple(orders), grid_size
        self.global_pool, self.head_hidden, self.head_drop = global_pool, head_hidden, head_drop
        self.pretrained_cfg: dict = {}  # build_model sets the entry's cfg

        self.encoder = PatchEncoder(encoder_dims)
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, trans_dim))
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linspace; plain floats for meta init
        check_mixer("PointMamba", mixer)
        self.blocks = MambaEncoder(trans_dim, depth, dpr, rms_norm=rms_norm, ssm_cfg=ssm_cfg, mixer=mixer,
                                   layer_shuffle=layer_shuffle)
        # Order indicators: one scale/shift pair per serialization order (official names).
        for i, _ in enumerate(self.orders, start=1):
            gamma, beta = _order_scale(trans_dim)
            setattr(self, f"OrderScale_gamma_{i}", gamma)
            setattr(self, f"OrderScale_beta_{i}", beta)
        self.cls_head_finetune = self._make_head(num_classes)
        self._init_non_mixer()

    def _make_head(self, num_classes: int) -> nn.Module:
        if num_classes == 0:
            return nn.Identity()
        width = self.trans_dim * (2 if self.global_pool == "avg_max" else 1)
        h = self.head_hidden
        head = nn.Sequential(
            nn.Linear(width, h), nn.BatchNorm1d(h), nn.ReLU(inplace=True), nn.Dropout(self.head_drop),
            nn.Linear(h, h), nn.BatchNorm1d(h), nn.ReLU(inplace=True), nn.Dropout(self.head_drop),
            nn.Linear(h, num_classes),
        )
        for m in head.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        return head

    def _init_non_mixer(self) -> None:
        # Official from-scratch init (trunc-normal 0.02) for the embeddings; the Mamba blocks keep
        # mamba-ssm's init (the official code also re-initialises the mixers' linears and zeroes
        # dt_proj's bias, which puts every channel's step at softplus(0); we do not).
        for mod in (self.encoder, self.pos_embed):
            for m in mod.modules():
                if isinstance(m, (nn.Linear, nn.Conv1d)):
                    trunc_normal_(m.weight, std=0.02)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ timm-style interface
    @torch.jit.ignore
    def no_weight_decay(self):
        return {n for n, p in self.named_parameters() if n.startswith("OrderScale_") or getattr(p, "_no_weight_decay", False)}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r"^encoder|^pos_embed|^OrderScale", blocks=r"^blocks\.layers\.(\d+)" if coarse else [(r"^blocks\.layers\.(\d+)", None), (r"^blocks\.norm_f", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.blocks.grad_checkpointing = enable

    @property
    def head_hidden_size(self) -> int:
        """Width of forward_head(pre_logits=True): the pooled tokens (2 x trans_dim for "avg_max")."""
        return self.trans_dim * (2 if self.global_pool == "avg_max" else 1)

    def get_classifier(self) -> nn.Module:
        """The head's last Linear (``cls_head_finetune.8``, the cfg's ``classifier``), as timm's MLP heads; the
        whole head (Linear-BN-ReLU-Dropout x 2, Linear: the official layout) is ``cls_head_finetune``."""
        head = self.cls_head_finetune
        return head[-1] if isinstance(head, nn.Sequential) else head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            if global_pool not in ("avg", "max", "avg_max"):
                raise ValueError(f"PointMamba: global_pool must be 'avg', 'max' or 'avg_max', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.cls_head_finetune = self._make_head(num_classes)

    # ------------------------------------------------------------------ forward
    def embed(self, pts: torch.Tensor, lengths: Optional[torch.Tensor] = None):
        """Patch tokens (B, G, C), centre positions (B, G, C) and centres (B, G, 3)."""
        need = max(self.num_group, self.group_size)
        check_points(pts, lengths, f"PointMamba (num_group={self.num_group}, group_size={self.group_size})", min_points=need)
        neighborhood, center, _ = group_points(pts, self.num_group, self.group_size, lengths)
        return self.encoder(neighborhood), self.pos_embed(center), center

    def serialize_tokens(self, tokens: torch.Tensor, pos: torch.Tensor, center: torch.Tensor):
        """One copy of (tokens, pos) per order, sorted along it, tokens scaled by the order's
        indicator; concatenated along the sequence: (B, len(orders) * G, C) each."""
        xs, ps = [], []
        for i, order in enumerate(self.orders, start=1):
            perm, _ = serialize(center, order, self.grid_size)
            gamma, beta = getattr(self, f"OrderScale_gamma_{i}"), getattr(self, f"OrderScale_beta_{i}")
            xs.append(gather_points(tokens, perm) * gamma + beta)
            ps.append(gather_points(pos, perm))
        return torch.cat(xs, 1), torch.cat(ps, 1)

    def forward_features(self, pts: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, N, 3) -> normalised tokens (B, len(orders) * num_group, trans_dim)."""
        tokens, pos, center = self.embed(pts, lengths)
        x, pos = self.serialize_tokens(tokens, pos, center)
        return self.blocks(x, pos)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(1)
        elif self.global_pool == "max":
            x = x.amax(1)
        else:
            x = torch.cat([x.mean(1), x.amax(1)], dim=-1)
        if pre_logits:
            return x
        # The official head keeps BatchNorm1d (checkpoints load by name), so training on a batch of 1 is an error,
        # raised here in plain words; eval mode (running statistics) takes any batch.
        check_head_batch(type(self).__name__, self.cls_head_finetune, x)
        return self.cls_head_finetune(x)

    def forward(self, pts: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(pts, lengths))


class FeaturePropagation(nn.Module):
    """PointNet++ feature propagation: inverse-distance interpolation from the 3 nearest sources,
    concatenated with the targets' own features, then Conv1d-BN-ReLU layers."""

    def __init__(self, in_channel: int, mlp: Sequence[int]):
        super().__init__()
        self.mlp_convs, self.mlp_bns = nn.ModuleList(), nn.ModuleList()
        for c in mlp:
            self.mlp_convs.append(nn.Conv1d(in_channel, c, 1))
            self.mlp_bns.append(nn.BatchNorm1d(c))
            in_channel = c

    def forward(self, xyz: torch.Tensor, src_xyz: torch.Tensor, feats: torch.Tensor, src_feats: torch.Tensor) -> torch.Tensor:
        """xyz (B, N, 3), src_xyz (B, S, 3), feats (B, N, D) or None, src_feats (B, S, D') -> (B, C, N)."""
        dist, idx = knn(xyz, src_xyz, min(3, src_xyz.shape[1]))
        weight = 1.0 / (dist + 1e-8)
        weight = weight / weight.sum(-1, keepdim=True)
        b, n, k = idx.shape
        near = gather_points(src_feats, idx.reshape(b, n * k)).reshape(b, n, k, -1)
        x = (near * weight[..., None]).sum(2)
        x = torch.cat([feats, x], -1) if feats is not None else x
        x = x.transpose(1, 2)
        for conv, bn in zip(self.mlp_convs, self.mlp_bns):
            x = F.relu(bn(conv(x)))
        return x


class PointMambaPartSeg(PointMamba):
    """Part segmentation with the head of PointMamba's part-segmentation code (``old`` branch,
    ``part_segmentation/models/pt_mamba.py``, itself Point-MAE's) on the NeurIPS backbone: the
    normalised streams after blocks 3, 7 and 11 pass one more LayerNorm and are concatenated
    (3 x 384), their max and mean over tokens and a 16-way object-label embedding form the global
    feature, the token features are interpolated back to every point, and a point-wise MLP gives
    ``num_parts`` logits per point. No official checkpoint exists for this combination (the old
    branch's backbone read x/y/z-sorted tokens without order indicators).
    """

    def __init__(self, num_parts: int = 50, num_object_classes: int = 16, num_group: int = 128,
                 fetch_idx: Sequence[int] = (3, 7, 11), **kwargs):
        super().__init__(num_classes=0, num_group=num_group, **kwargs)
        c = self.trans_dim
        self.num_parts, self.num_object_classes, self.fetch_idx = num_parts, num_object_classes, tuple(fetch_idx)
        self.norm = nn.LayerNorm(c)
        self.label_conv = nn.Sequential(nn.Conv1d(num_object_classes, 64, 1, bias=False), nn.BatchNorm1d(64), nn.LeakyReLU(0.2))
        feat = c * len(self.fetch_idx)
        self.propagation_0 = FeaturePropagation(feat + 3, [c * 4, 1024])
        self.convs1 = nn.Conv1d(1024 + 2 * feat + 64, 512, 1)
        self.dp1 = nn.Dropout(0.5)
        self.convs2 = nn.Conv1d(512, 256, 1)
        self.convs3 = nn.Conv1d(256, num_parts, 1)
        self.bns1, self.bns2 = nn.BatchNorm1d(512), nn.BatchNorm1d(256)

    @property
    def head_hidden_size(self) -> int:
        return self.convs3.in_channels

    def get_classifier(self) -> nn.Module:
        """The point-wise classifier (``convs3``: 256 -> num_parts logits per point)."""
        return self.convs3

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new point-wise classifier for ``num_classes`` parts (global_pool is not used here)."""
        check_num_classes("PointMambaPartSeg", num_classes)
        if num_classes < 1:
            raise ValueError(f"PointMambaPartSeg: the part classifier needs num_classes >= 1, got {num_classes}")
        self.num_parts = num_classes
        self.convs3 = nn.Conv1d(self.convs3.in_channels, num_classes, 1)

    def forward(self, pts: torch.Tensor, object_label: torch.Tensor) -> torch.Tensor:
        """pts (B, N, 3), object_label (B,) in [0, num_object_classes) -> part logits (B, N, num_parts)."""
        b, n, _ = pts.shape
        if object_label.shape != (b,):
            raise ValueError(f"PointMambaPartSeg: expected object_label of shape ({b},), got {tuple(object_label.shape)}")
        if b and (int(object_label.min()) < 0 or int(object_label.max()) >= self.num_object_classes):
            raise ValueError(f"PointMambaPartSeg: object labels must lie in [0, {self.num_object_classes}), "
                             f"got min {int(object_label.min())}, max {int(object_label.max())}")
        # The label embedding's BatchNorm sees one value per sample: a batch of 1 cannot train (official layout).
        check_head_batch("PointMambaPartSeg", self.label_conv, object_label[:, None])
        tokens, pos, center = self.embed(pts)
        x, pos = self.serialize_tokens(tokens, pos, center)
        centers = torch.cat([gather_points(center, serialize(center, o, self.grid_size)[0]) for o in self.orders], 1)
        feats = torch.cat([self.norm(f) for f in self.blocks.forward_intermediates(x, pos, self.fetch_idx)], -1)
        label = F.one_hot(object_label.long(), self.num_object_classes).to(feats.dtype)[:, :, None]
        glob = torch.cat([feats.amax(1), feats.mean(1), self.label_conv(label)[..., 0]], -1)
        x = self.propagation_0(pts, centers, pts, feats)
        x = torch.cat([x, glob[:, :, None].expand(-1, -1, n)], 1)
        x = self.dp1(F.relu(self.bns1(self.convs1(x))))
        x = F.relu(self.bns2(self.convs2(x)))
        return self.convs3(x).transpose(1, 2)


def chamfer_l2(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Point-MAE's ChamferDistanceL2: mean squared distance from each predicted point to its nearest
    target point plus the reverse, averaged over the batch of point sets (B, P, 3) / (B, T, 3)."""
    d = torch.cdist(upcast(pred), upcast(target)).square()
    return d.amin(dim=2).mean() + d.amin(dim=1).mean()


class PointMambaMPM(nn.Module):
    """PointMamba's serialization-based masked point modelling (official
    ``Point_MAE_Mamba_serializationV2``): per step one order (Hilbert or Trans-Hilbert) is drawn,
    patches are serialized along it and get its order indicator, ``mask_ratio`` of them are hidden
    at random, the encoder reads the visible ones, a 4-block Mamba decoder reads the full sequence
    (mask tokens in the hidden slots, decoder positions for all), and a linear head rebuilds the
    hidden patches' points, scored by the L2 Chamfer distance. ``forward`` returns the loss.
    """

    def __init__(
        self, trans_dim: int = 384, depth: int = 12, decoder_depth: int = 4, num_group: int = 64, group_size: int = 32,
        mask_ratio: float = 0.6, drop_path_rate: float = 0.1, rms_norm: bool = False,
        orders: Sequence[str] = ("hilbert", "hilbert-trans"), grid_size: float = 0.02,
        mixer: str = "mamba", ssm_cfg: Optional[dict] = None,
    ):
        super().__init__()
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"PointMambaMPM: mask_ratio must lie in (0, 1), got {mask_ratio}")
        self.mask_ratio, self.num_group, self.group_size = mask_ratio, num_group, group_size
        self.pretrained_cfg: dict = {}
        self.MAE_encoder = PointMamba(
            num_classes=0, trans_dim=trans_dim, depth=depth, num_group=num_group, group_size=group_size,
            drop_path_rate=drop_path_rate, rms_norm=rms_norm, orders=orders, grid_size=grid_size, mixer=mixer,
            ssm_cfg=ssm_cfg,
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, trans_dim))
        trunc_normal_(self.mask_token, std=0.02)
        self.decoder_pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, trans_dim))
        self.MAE_decoder = nn.Module()
        dpr = [drop_path_rate * i / max(decoder_depth - 1, 1) for i in range(decoder_depth)]
        self.MAE_decoder.blocks = MambaEncoder(trans_dim, decoder_depth, dpr, rms_norm=rms_norm, ssm_cfg=ssm_cfg, mixer=mixer)
        self.increase_dim = nn.Sequential(nn.Conv1d(trans_dim, 3 * group_size, 1))

    def forward(self, pts: torch.Tensor, return_reconstruction: bool = False):
        enc = self.MAE_encoder
        check_points(pts, None, f"PointMambaMPM (num_group={self.num_group}, group_size={self.group_size})",
                     min_points=max(self.num_group, self.group_size))
        neighborhood, center, _ = group_points(pts, self.num_group, self.group_size)
        b, g, k, _ = neighborhood.shape
        which = int(torch.randint(len(enc.orders), ()))
        perm, _ = serialize(center, enc.orders[which], enc.grid_size)
        center, neighborhood = gather_points(center, perm), gather_points(neighborhood, perm)
        gamma, beta = getattr(enc, f"OrderScale_gamma_{which + 1}"), getattr(enc, f"OrderScale_beta_{which + 1}")
        tokens = enc.encoder(neighborhood) * gamma + beta
        num_mask = int(self.mask_ratio * g)
        mask = torch.rand(b, g, device=pts.device).argsort(dim=1).argsort(dim=1) < num_mask  # random, num_mask per cloud
        c = tokens.shape[-1]
        visible = enc.blocks(tokens[~mask].reshape(b, g - num_mask, c), enc.pos_embed(center[~mask].reshape(b, -1, 3)))
        full = self.mask_token.expand(b, g, c).clone()
        full[~mask] = visible.reshape(-1, c).to(full.dtype)
        decoded = self.MAE_decoder.blocks(full, self.decoder_pos_embed(center))[mask].reshape(b, num_mask, c)
        rebuilt = self.increase_dim(decoded.transpose(1, 2)).transpose(1, 2).reshape(b * num_mask, k, 3)
        loss = chamfer_l2(rebuilt, neighborhood[mask].reshape(b * num_mask, k, 3))
        if return_reconstruction:
            return loss, rebuilt.reshape(b, num_mask, k, 3) + center[mask].reshape(b, num_mask, 1, 3)
        return loss


def mpm_checkpoint_filter_fn(state_dict: dict, model: PointMambaMPM) -> dict:
    """Official pre-training checkpoint (``{"base_model": ...}``, DDP ``module.``) -> PointMambaMPM."""
    if isinstance(state_dict.get("base_model"), dict):
        state_dict = state_dict["base_model"]
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}


def checkpoint_filter_fn(state_dict: dict, model: PointMamba) -> dict:
    """Official PointMamba checkpoint -> this model's state dict.

    Accepts the saved file's dict (``{"base_model": ..., "optimizer": ...}``, or ``"model"``) or
    a bare state dict; strips DDP's ``module.`` and the pre-training wrapper ``MAE_encoder.``,
    drops the pre-training decoder (``MAE_decoder``, ``increase_dim``, ``mask_token``,
    ``decoder_pos_embed``), and replaces a classifier of another shape (or a missing one, from a
    pre-training checkpoint) with the model's own fresh head so strict loading passes.
    """
    for key in ("base_model", "model"):
        if isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
            break
    own = model.state_dict()
    out = {}
    for k, v in state_dict.items():
        if k.startswith("module."):
            k = k[len("module."):]
        if k.startswith("MAE_encoder."):
            k = k[len("MAE_encoder."):]
        elif k.startswith(("MAE_decoder.", "increase_dim.", "decoder_pos_embed.")) or k == "mask_token":
            continue
        if k.startswith("cls_head_finetune."):
            if k not in own or own[k].shape != v.shape:
                continue
        out[k] = v
    for k, v in own.items():
        if k.startswith("cls_head_finetune.") and k not in out:
            out[k] = v
    return out


# ---------------------------------------------------------------------- entries

# The modules timm adapts when it loads weights into another in_chans / num_classes: the patch encoder's first
# conv and the last Linear of the classification MLP.
_HEAD_CFG = dict(first_conv="encoder.first_conv.0", classifier="cls_head_finetune.8")


def _cfg(url: str, num_classes: int, num_points: int, metrics: dict, notes: str) -> dict:
    return dict(
        url=url, num_classes=num_classes, input_size=(num_points, 3), license="Apache-2.0", paper=_PAPER,
        source=_SOURCE, metrics=metrics, notes=notes, **_HEAD_CFG,
    )


# Accuracies: the "Main Results" table of the LMD0311/PointMamba README (ckpts-2 release). No sha256: the release
# files cannot be downloaded where this zoo is built; resolve_source checks one on download and load once registered.
register_pretrained_cfgs({
    "pointmamba_mpm.shapenet55": dict(
        url=_RELEASE + "pretrain.pth", license="Apache-2.0", paper=_PAPER, source=_SOURCE, metrics={},
        first_conv="MAE_encoder.encoder.first_conv.0",  # no classifier: the model returns its loss
        notes="cfgs/pretrain.yaml: masked point modelling on ShapeNet-55, 1024 points, mask ratio 0.6, 300 epochs",
    ),
    "pointmamba_modelnet40.modelnet40": _cfg(
        _RELEASE + "finetune_modelnet.pth", 40, 1024, {"modelnet40_oa": 93.6},
        "cfgs/finetune_modelnet.yaml; fine-tuned from the ShapeNet-55 masked point modelling checkpoint",
    ),
    "pointmamba_scanobjectnn.objbg": _cfg(
        _RELEASE + "finetune_scan_objbg.pth", 15, 2048, {"scanobjectnn_objbg_oa": 94.32},
        "cfgs/finetune_scan_objbg.yaml",
    ),
    "pointmamba_scanobjectnn.objonly": _cfg(
        _RELEASE + "finetune_scan_only.pth", 15, 2048, {"scanobjectnn_objonly_oa": 92.60},
        "cfgs/finetune_scan_objonly.yaml",
    ),
    "pointmamba_scanobjectnn.hardest": _cfg(
        _RELEASE + "finetune_scan_hardest.pth", 15, 2048, {"scanobjectnn_pb_t50_rs_oa": 89.31},
        "cfgs/finetune_scan_hardest.yaml",
    ),
})

# Trained here (configs/pretrained/pointmamba_tiny.shapes3d.yaml: `zoo points bench --models pointmamba --seeds 0`);
# float16 package data. Measured numbers: model_cards/pointmamba.md.
register_pretrained_cfgs({
    "pointmamba_tiny.shapes3d": dict(
        file="weights/pointmamba_tiny.shapes3d.safetensors",
        sha256="555858d3df8eb041068b31717b76ce56ff1f02c7de5254fad2709d76f76c574f",
        num_classes=5, input_size=(512, 3), license="Apache-2.0", paper=_PAPER, source="mamba-zoo", **_HEAD_CFG,
        model_kwargs=dict(num_classes=5),
        notes="Trained from scratch on Shapes3D (zoo.data.shapes3d: sphere, box, cylinder, cone, torus; 512 points) "
              "by zoo's points benchmark recipe, 20 epochs.",
    ),
})


# No weights: the architecture's cfg, so timm and zoo see its input and its per-point classifier.
register_pretrained_cfgs({
    "pointmamba_partseg": dict(
        input_size=(2048, 3), license="Apache-2.0", paper=_PAPER, source=_SOURCE,
        first_conv="encoder.first_conv.0", classifier="convs3",
        notes="ShapeNetPart layout (16 object categories, 50 parts); no official checkpoint for this combination.",
    ),
})


def _create(variant: str, pretrained: bool, cfg: dict, kwargs: dict) -> PointMamba:
    return build_model(PointMamba, variant, pretrained, checkpoint_filter_fn=checkpoint_filter_fn, **{**cfg, **kwargs})


@register_model
def pointmamba_modelnet40(pretrained: bool = False, **kwargs) -> PointMamba:
    """PointMamba for ModelNet40 (1024 points): 64 patches of 32 points, 12 blocks of width 384."""
    return _create("pointmamba_modelnet40", pretrained, dict(num_classes=40, num_group=64, drop_path_rate=0.1), kwargs)


@register_model
def pointmamba_scanobjectnn(pretrained: bool = False, **kwargs) -> PointMamba:
    """PointMamba for ScanObjectNN (2048 points): 128 patches of 32 points, 12 blocks of width 384."""
    return _create("pointmamba_scanobjectnn", pretrained, dict(num_classes=15, num_group=128, drop_path_rate=0.5), kwargs)


@register_model
def pointmamba_tiny(pretrained: bool = False, **kwargs) -> PointMamba:
    """PointMamba at CPU scale (zoo's points benchmark): width 96, 4 blocks, 32 patches of 16 points (512 points)."""
    cfg = dict(trans_dim=96, depth=4, num_group=32, group_size=16, drop_path_rate=0.1, head_hidden=128)
    return _create("pointmamba_tiny", pretrained, cfg, kwargs)


@register_model
def pointmamba_mpm(pretrained: bool = False, **kwargs) -> PointMambaMPM:
    """PointMamba masked point modelling (pre-training): 12-block encoder, 4-block decoder, mask 0.6."""
    return build_model(PointMambaMPM, "pointmamba_mpm", pretrained, checkpoint_filter_fn=mpm_checkpoint_filter_fn, **kwargs)


@register_model
def pointmamba_partseg(pretrained: bool = False, **kwargs) -> PointMambaPartSeg:
    """PointMamba part segmentation (ShapeNetPart layout: 2048 points, 128 patches, 16 objects, 50 parts)."""
    return build_model(PointMambaPartSeg, "pointmamba_partseg", pretrained, checkpoint_filter_fn=checkpoint_filter_fn, **kwargs)
