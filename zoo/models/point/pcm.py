"""Point Cloud Mamba (PCM; Zhang et al., arXiv:2403.00762): a PointMLP-style hierarchy whose stages
end in bidirectional Mamba layers, each reading the points in its own serialization order.

Per stage (SkyworkAI/PointCloudMamba, openpoints/models/PCM/PCM.py, ``PointMambaEncoder``): FPS
keeps every ``reducer``-th share of the points (indices sorted, so the current sequence order
survives), a geometric affine module groups ``k`` neighbours (features and xyz relative to the
anchor, normalised by the cloud's std, learned affine), a residual point MLP max-pools each group,
and then each Mamba layer of the stage

1. re-serializes the points along its order (Consistent Traverse Serialization ``xyz`` ... ``zyx``,
   or Hilbert / z-order curves),
2. adds the coordinate-mapping positional encoding (a per-stage linear map of xyz),
3. wraps the sequence in its order's point prompts (learned tokens, projected to the stage width,
   put at both ends) and runs a bidirectional Mamba block (Vim's v2 mixer, outputs summed).

The residual stream runs through all stages (gathered with the points, projected when the width
changes). The class feature is the max over the last stage's mixer outputs; the head is openpoints'
ClsHead (Linear-BN-ReLU-Dropout x2, Linear).

Names follow the official modules (``encoder.local_grouper_list``, ``encoder.pre_blocks_list``,
``encoder.mamba_blocks_list.{stage}.{j}.mixer``, ``encoder.pos_proj``, ``encoder.order_prompt``,
``prediction.head``) so official checkpoints load by name.

Deliberate deviations (documented, because they change orders, not weights):

- CTS follows the paper by default (a snake scan: the first named axis fastest, reversing on every
  step of the next). The released ``encode_cts`` multiplies by the axis maxima where it means the
  coordinates, so its codes order the points by the first axis alone; ``cts_variant="official"``
  reproduces that (ties in input order; the sign rule per cloud rather than per batch), which is
  what official checkpoints were trained with.
- Prompt rows are assigned to orders by first appearance in ``orders``; the official code assigns
  them by iterating a Python ``set`` of strings, whose order depends on the training process's hash
  seed, so an official checkpoint's prompt-to-order assignment cannot be recovered from the file.

Precision, as the released configs (cfgs/*/PCM*.yaml: rms_norm, fused_add_norm and residual_in_fp32 all
True): RMSNorm in float32, the residual stream in float32, the mixers' A, D and dt bias in float32, FPS
distances in float32 (float64 clouds stay float64). One difference under float16/bfloat16 autocast, none in
float32: where a stage widens the stream through ``residual_proj``, the official fused norm keeps the
projection's (half) dtype for the residual of the later stages; here the residual stays float32 throughout.

Fixed-size batches only: (B, N, 3) with the same N for every cloud.
"""
from __future__ import annotations

from functools import partial
from typing import List, Optional, Sequence

import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import nn

from zoo.core import ResidualBlock, RMSNorm, init_mamba_weights
from zoo.core.mixers import check_mixer, create_mixer
from zoo.core.checks import check_float, check_int, check_ints, check_num_classes, check_rates, check_sizes
from zoo.registry import build_model, register_model, register_pretrained_cfgs

from .ops import check_head_batch, farthest_point_sample, knn
from .serialization import ORDERS, check_points, gather_points, serialize

_PAPER = "Point Cloud Mamba: Point Cloud Learning via State Space Model (Zhang et al., arXiv:2403.00762)"
_SOURCE = "https://github.com/SkyworkAI/PointCloudMamba"
PCM_ORDERS = ("xyz", "xzy", "yxz", "yzx", "zxy", "zyx", "hilbert", "z", "z-trans")


class ConvBNReLU1D(nn.Module):
    def __init__(self, cin: int, cout: int, bias: bool = False):
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(cin, cout, 1, bias=bias), nn.BatchNorm1d(cout), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvBNReLURes1D(nn.Module):
    def __init__(self, channels: int, bias: bool = False):
        super().__init__()
        self.net1 = nn.Sequential(nn.Conv1d(channels, channels, 1, bias=bias), nn.BatchNorm1d(channels), nn.ReLU(inplace=True))
        self.net2 = nn.Sequential(nn.Conv1d(channels, channels, 1, bias=bias), nn.BatchNorm1d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.net2(self.net1(x)) + x)


class LocalGrouper(nn.Module):
    """PointMLP's geometric affine module with anchor normalisation and xyz appended."""

    def __init__(self, channels: int, reducer: int, k: int):
        super().__init__()
        self.reducer, self.k = reducer, k
        self.affine_alpha = nn.Parameter(torch.ones(1, 1, 1, channels + 3))
        self.affine_beta = nn.Parameter(torch.zeros(1, 1, 1, channels + 3))

    def forward(self, xyz: torch.Tensor, feats: torch.Tensor, res: Optional[torch.Tensor]):
        b, n, _ = xyz.shape
        s = n // self.reducer
        if s != n:
            idx = farthest_point_sample(xyz, s).sort(dim=1).values  # sorted: keep the sequence order
            new_xyz, new_feats = gather_points(xyz, idx), gather_points(feats, idx)
            res = gather_points(res, idx) if res is not None else None
        else:
            new_xyz, new_feats = xyz, feats
        _, nn_idx = knn(new_xyz, xyz, self.k)
        flat = nn_idx.reshape(b, s * self.k)
        grouped = torch.cat([gather_points(feats, flat), gather_points(xyz, flat)], -1).reshape(b, s, self.k, -1)
        anchor = torch.cat([new_feats, new_xyz], -1)[:, :, None]
        std = (grouped - anchor).reshape(b, -1).std(dim=-1)[:, None, None, None]  # one scale per cloud
        grouped = self.affine_alpha * (grouped - anchor) / (std + 1e-5) + self.affine_beta
        grouped = torch.cat([grouped, new_feats[:, :, None].expand(-1, -1, self.k, -1)], -1)
        return new_xyz, grouped, res


class PreExtraction(nn.Module):
    """(B, S, k, 2C + 3) groups -> (B, S, C_out): point MLP with residual blocks, max over k."""

    def __init__(self, channels: int, out_channels: int, blocks: int = 1):
        super().__init__()
        self.transfer = ConvBNReLU1D(2 * channels + 3, out_channels)
        self.operation = nn.Sequential(*[ConvBNReLURes1D(out_channels) for _ in range(blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, k, d = x.shape
        x = self.operation(self.transfer(x.reshape(b * s, k, d).transpose(1, 2)))
        return x.amax(dim=2).reshape(b, s, -1)


class PCMEncoder(nn.Module):
    def __init__(
        self,
        in_channels: int = 3,
        embed_dim: int = 384,
        dim_expansion: Sequence[int] = (1, 1, 2, 1),
        pre_blocks: Sequence[int] = (1, 1, 1, 1),
        mamba_blocks: Sequence[int] = (1, 2, 2, 4),
        k_neighbors: Sequence[int] = (12, 12, 12, 12),
        reducers: Sequence[int] = (1, 2, 2, 2),
        orders: Sequence[str] = PCM_ORDERS,
        prompt_num_per_order: int = 6,
        prompt_dim: int = 384,
        drop_path_rate: float = 0.1,
        grid_size: float = 0.02,
        cts_variant: str = "snake",
        mixer: str = "bimamba",
        mixer_cfg: Optional[dict] = None,
    ):
        super().__init__()
        check_mixer("PCM", mixer)
        if cts_variant not in ("snake", "official"):
            raise ValueError(f"PCM: cts_variant must be 'snake' or 'official', got {cts_variant!r}")
        self.cts_variant = cts_variant
        for name, values, low in (("dim_expansion", dim_expansion, 1), ("pre_blocks", pre_blocks, 0),
                                  ("mamba_blocks", mamba_blocks, 0), ("k_neighbors", k_neighbors, 1), ("reducers", reducers, 1)):
            check_ints(f"PCM: {name}", values, low)
        check_sizes("PCM", embed_dim=embed_dim, prompt_dim=prompt_dim)
        check_int("PCM: prompt_num_per_order", prompt_num_per_order, 0)
        check_rates("PCM", drop_path_rate=drop_path_rate)
        check_float("PCM: grid_size", grid_size, 0, low_open=True)
        stages = len(dim_expansion)
        if not len(pre_blocks) == len(mamba_blocks) == len(k_neighbors) == len(reducers) == stages:
            raise ValueError(
                "PCM: dim_expansion, pre_blocks, mamba_blocks, k_neighbors and reducers need one entry per stage, got "
                f"lengths {len(dim_expansion)}, {len(pre_blocks)}, {len(mamba_blocks)}, {len(k_neighbors)}, {len(reducers)}"
            )
        n_layers = sum(mamba_blocks)
        if len(orders) != n_layers:
            raise ValueError(f"PCM: expected one order per Mamba layer ({n_layers}), got {len(orders)}: {list(orders)}")
        unknown = [o for o in orders if o not in ORDERS]
        if unknown:
            raise ValueError(f"PCM: unknown orders {unknown}; expected some of {ORDERS}")
        self.orders, self.grid_size, self.mamba_blocks = tuple(orders), grid_size, tuple(mamba_blocks)
        self.k_neighbors, self.reducers = tuple(k_neighbors), tuple(reducers)
        self.in_channels = in_channels
        self.embedding = ConvBNReLU1D(in_channels, embed_dim)
        self.grad_checkpointing = False  # set_grad_checkpointing: recompute each Mamba block in the backward

        unique = list(dict.fromkeys(orders))  # first appearance (see the module docstring)
        self.prompt_num = prompt_num_per_order
        self.order_prompt = nn.Embedding(len(unique) * prompt_num_per_order, prompt_dim)
        self._prompt_row = {o: i * prompt_num_per_order for i, o in enumerate(unique)}

        dpr = [drop_path_rate * i / max(n_layers - 1, 1) for i in range(n_layers)]
        rates = [0.0] + dpr  # block j adds block j-1's (drop-pathed) output: official inter_dpr
        self.local_grouper_list, self.pre_blocks_list = nn.ModuleList(), nn.ModuleList()
        self.mamba_blocks_list, self.residual_proj_blocks_list = nn.ModuleList(), nn.ModuleList()
        self.pos_proj, self.order_prompt_proj = nn.ModuleList(), nn.ModuleList()
        last, layer = embed_dim, 0
        for i in range(stages):
            out = last * dim_expansion[i]
            self.local_grouper_list.append(LocalGrouper(last, reducers[i], k_neighbors[i]))
            self.pre_blocks_list.append(PreExtraction(last, out, pre_blocks[i]))
            self.residual_proj_blocks_list.append(nn.Identity() if last == out or i == 0 else nn.Linear(last, out, bias=False))
            self.pos_proj.append(nn.Linear(3, out, bias=False))
            self.order_prompt_proj.append(nn.Linear(prompt_dim, out, bias=False))
            blocks = nn.Sequential()
            for _ in range(mamba_blocks[i]):
                block_mixer = create_mixer(mixer, out, 16, 4, 2, layer_idx=layer, divide_out=False, mixer_cfg=mixer_cfg)
                blocks.append(ResidualBlock(out, block_mixer, RMSNorm(out, eps=1e-5), drop_path=rates[layer]))
                layer += 1
            self.mamba_blocks_list.append(blocks)
            last = out
        self.out_channels = last
        self.mamba_blocks_list.apply(partial(init_mamba_weights, n_layer=n_layers))
        nn.init.normal_(self.order_prompt.weight, std=0.02)

    def forward(self, xyz: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """xyz (B, N, 3), per-point features (B, N, in_channels) -> class feature (B, out_channels)."""
        x = self.embedding(feats.transpose(1, 2)).transpose(1, 2)
        res, layer = None, 0
        for i in range(len(self.mamba_blocks)):
            xyz, grouped, res = self.local_grouper_list[i](xyz, x, res)
            x = self.pre_blocks_list[i](grouped)
            res = self.residual_proj_blocks_list[i](res) if res is not None else None
            for block in self.mamba_blocks_list[i]:
                perm, _ = serialize(xyz, self.orders[layer], self.grid_size, cts_variant=self.cts_variant)
                xyz, x = gather_points(xyz, perm), gather_points(x, perm)
                res = gather_points(res, perm) if res is not None else None
                x = x + self.pos_proj[i](xyz)
                row = self._prompt_row[self.orders[layer]]
                prompt = self.order_prompt_proj[i](self.order_prompt.weight[row : row + self.prompt_num])
                prompt = prompt.unsqueeze(0).expand(x.shape[0], -1, -1)
                x = torch.cat([prompt, x, prompt], 1)
                if res is not None:
                    res = torch.cat([prompt.to(res.dtype), res, prompt.to(res.dtype)], 1)
                if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                    x, res = torch.utils.checkpoint.checkpoint(block, x, res, use_reentrant=False)
                else:
                    x, res = block(x, res)
                x, res = x[:, self.prompt_num : -self.prompt_num], res[:, self.prompt_num : -self.prompt_num]
                layer += 1
        # The official class feature: max over the last mixer outputs (no final residual add or norm).
        return x.amax(dim=1)


class PCMHead(nn.Module):
    """openpoints' ClsHead with mlps [512, 256], BatchNorm and dropout 0.5."""

    def __init__(self, in_channels: int, num_classes: int, mlps: Sequence[int] = (512, 256), dropout: float = 0.5):
        super().__init__()
        layers: List[nn.Module] = []
        c = in_channels
        for w in mlps:
            layers += [nn.Sequential(nn.Linear(c, w, bias=False), nn.BatchNorm1d(w), nn.ReLU(inplace=True)), nn.Dropout(dropout)]
            c = w
        layers.append(nn.Sequential(nn.Linear(c, num_classes)))
        self.head = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


class PointCloudMamba(nn.Module):
    """PCM classifier on xyz (B, N, 3). ``in_channels`` 4 appends the height above the cloud's
    lowest point along y (the gravity axis of ScanObjectNN in openpoints) as the fourth feature."""

    def __init__(self, num_classes: int = 40, in_channels: int = 3, embed_dim: int = 384, **encoder_kwargs):
        super().__init__()
        if in_channels not in (3, 4):
            raise ValueError(f"PointCloudMamba: in_channels must be 3 (xyz) or 4 (xyz + height), got {in_channels}")
        check_num_classes("PointCloudMamba", num_classes)
        check_sizes("PointCloudMamba", embed_dim=embed_dim)
        self.num_classes = num_classes
        self.pretrained_cfg: dict = {}  # build_model sets the entry's cfg
        self.encoder = PCMEncoder(in_channels=in_channels, embed_dim=embed_dim, **encoder_kwargs)
        self.num_features = self.head_hidden_size = self.encoder.out_channels  # pre-logits: the pooled feature
        self.prediction = PCMHead(self.num_features, num_classes) if num_classes else nn.Identity()

    def _min_points(self) -> int:
        # Stage i needs k_i points to search and keeps N // r_i of them for the next stage.
        need = 1
        for r, k in zip(reversed(self.encoder.reducers), reversed(self.encoder.k_neighbors)):
            need = max(k, r, need * r)
        return need

    def no_weight_decay(self):
        return {n for n, p in self.named_parameters() if getattr(p, "_no_weight_decay", False)}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        """The head's last Linear (``prediction.head.4.0``, the cfg's ``classifier``), as timm's MLP heads; the
        whole head is ``prediction``."""
        return self.prediction.head[-1][0] if isinstance(self.prediction, PCMHead) else self.prediction

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.prediction = PCMHead(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward_features(self, pts: torch.Tensor) -> torch.Tensor:
        """(B, N, 3) -> pooled class feature (B, num_features)."""
        need = self._min_points()
        check_points(pts, None, f"PointCloudMamba (reducers={list(self.encoder.reducers)}, "
                                f"k_neighbors={list(self.encoder.k_neighbors)})", min_points=need)
        feats = pts
        if self.encoder.in_channels == 4:
            feats = torch.cat([pts, pts[..., 1:2] - pts[..., 1:2].amin(dim=1, keepdim=True)], -1)
        return self.encoder(pts, feats)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if pre_logits:
            return x
        check_head_batch("PointCloudMamba", self.prediction, x)
        return self.prediction(x)

    def forward(self, pts: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(pts))


def checkpoint_filter_fn(state_dict: dict, model: PointCloudMamba) -> dict:
    """Official PCM checkpoint (openpoints: ``{"model": ..., "optimizer": ...}``, maybe with DDP's
    ``module.``) -> this model's state dict; a classifier of another shape is replaced by the
    model's own. See the module docstring for the prompt rows' assignment."""
    if isinstance(state_dict.get("model"), dict):
        state_dict = state_dict["model"]
    own = model.state_dict()
    out = {}
    for k, v in state_dict.items():
        k = k[len("module."):] if k.startswith("module.") else k
        if k.startswith("prediction.") and (k not in own or own[k].shape != v.shape):
            continue
        out[k] = v
    for k, v in own.items():
        if k.startswith("prediction.") and k not in out:
            out[k] = v
    return out


def _cfg(num_classes: int, metrics: dict, notes: str) -> dict:
    return dict(num_classes=num_classes, input_size=(1024, 3), license="unspecified (the repository has no license file)",
                paper=_PAPER, source=_SOURCE, metrics=metrics, notes=notes,
                # the modules timm adapts for another in_chans / num_classes: the embedding conv, the last Linear
                first_conv="encoder.embedding.net.0", classifier="prediction.head.4.0")


# Accuracies: the "Pretrained weights" table of SkyworkAI/PointCloudMamba GETTING_STARTED.md. The
# weights live in the hf-hub repo zhangtao-whu/PCM under file names not listed there, so no source is
# registered; load them with checkpoint_path= and checkpoint_filter_fn.
register_pretrained_cfgs({
    "pcm_modelnet40.modelnet40": _cfg(40, {"modelnet40_oa": 93.1, "modelnet40_macc": 91.2}, "cfgs/modelnet40ply2048/PCM.yaml"),
    "pcm_scanobjectnn.hardest": _cfg(15, {"scanobjectnn_pb_t50_rs_oa": 88.0, "scanobjectnn_pb_t50_rs_macc": 86.4},
                                     "cfgs/scanobjectnn/PCM.yaml; input xyz + height (in_channels 4)"),
    "pcm_tiny_modelnet40.modelnet40": _cfg(40, {"modelnet40_oa": 93.3, "modelnet40_macc": 90.5}, "cfgs/modelnet40ply2048/PCM-Tiny.yaml"),
    "pcm_tiny_scanobjectnn.hardest": _cfg(15, {"scanobjectnn_pb_t50_rs_oa": 87.1, "scanobjectnn_pb_t50_rs_macc": 85.2},
                                          "cfgs/scanobjectnn/PCM-Tiny.yaml; input xyz + height (in_channels 4)"),
})

_TINY = dict(embed_dim=192, mamba_blocks=(1, 1, 2, 2), orders=PCM_ORDERS[:6])


def _create(variant: str, pretrained: bool, cfg: dict, kwargs: dict) -> PointCloudMamba:
    return build_model(PointCloudMamba, variant, pretrained, checkpoint_filter_fn=checkpoint_filter_fn, **{**cfg, **kwargs})


@register_model
def pcm_modelnet40(pretrained: bool = False, **kwargs) -> PointCloudMamba:
    """PCM (ModelNet40, 1024 xyz points): width 384/384/768/768, 1+2+2+4 bidirectional Mamba layers."""
    return _create("pcm_modelnet40", pretrained, dict(in_channels=3), kwargs)


@register_model
def pcm_scanobjectnn(pretrained: bool = False, **kwargs) -> PointCloudMamba:
    """PCM (ScanObjectNN PB-T50-RS, 1024 points, xyz + height)."""
    return _create("pcm_scanobjectnn", pretrained, dict(in_channels=4), kwargs)


@register_model
def pcm_tiny_modelnet40(pretrained: bool = False, **kwargs) -> PointCloudMamba:
    """PCM-Tiny (ModelNet40): width 192/192/384/384, 1+1+2+2 layers over the six CTS orders."""
    return _create("pcm_tiny_modelnet40", pretrained, dict(in_channels=3, **_TINY), kwargs)


@register_model
def pcm_tiny_scanobjectnn(pretrained: bool = False, **kwargs) -> PointCloudMamba:
    """PCM-Tiny (ScanObjectNN PB-T50-RS, xyz + height)."""
    return _create("pcm_tiny_scanobjectnn", pretrained, dict(in_channels=4, **_TINY), kwargs)
