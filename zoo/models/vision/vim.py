"""Vision Mamba (Vim; Zhu et al., ICML 2024): the official hustvl/Vim "midclstok" models.

Patch embedding -> class token inserted in the MIDDLE of the patch sequence (index N // 2 for N
patches) -> absolute position embedding -> 24 residual blocks (Add -> RMSNorm -> bidirectional
Mamba "v2", outputs of both directions halved before out_proj, residual stream in float32) ->
add + RMSNorm (norm_f) -> the class token -> linear head. This is the forward of the official
``vim_{tiny,small,base}_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2``
with ``rms_norm=True, fused_add_norm=True, residual_in_fp32=True``; parameter names are the
official ones, so official checkpoints load by name.

Differences from the official code (forward and checkpoints are unaffected):
- Any image size that fits the patch grid is accepted; the position embedding is resampled
  (bicubic, class token slot kept apart) when the grid differs from the one it was built for.
  The official code asserts the build size.
- Initialisation of the backward-direction ``dt_proj_b`` comes from ``zoo.core.BiMamba`` (the
  same LogUniform dt init as the forward direction); Vim's fork leaves it at PyTorch's default
  with a zero bias. Everything else is initialised as the official model.
- Checkpoint position embeddings are resampled with the class token taken from the middle slot;
  the official fine-tuning script (main.py --finetune) takes slot 0 as the class token even for
  middle-class-token models.

Precision, as the official configuration: the residual stream in float32 (residual_in_fp32), RMSNorm
computed in float32 and returned in the input dtype (the fused add + norm kernel on CUDA), the mixers' A, D
and dt bias in float32. float64 runs unrounded: the official ``.float()`` casts are ``upcast`` here, which
leaves float64 alone.
"""
from __future__ import annotations

from functools import partial
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, lecun_normal_, resample_patch_embed, to_2tuple, trunc_normal_
from timm.models._features import feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

from zoo.core import ResidualBlock, RMSNorm, add_norm, init_mamba_weights
from zoo.core.mixers import check_mixer, create_mixer
from zoo.core.shuffle import layer_shuffle_rates, shuffled
from zoo.core.checks import check_input_dtype, check_int, check_num_classes, check_rates, check_sizes
from zoo.registry import build_model, register_model, register_pretrained_cfgs

_PAPER = (
    "Vision Mamba: Efficient Visual Representation Learning with Bidirectional State Space Model "
    "(Zhu et al., ICML 2024, arXiv:2401.09417)"
)
_SOURCE = "https://github.com/hustvl/Vim"


# The modules timm adapts when it loads weights into another in_chans / num_classes.
_HEAD_CFG = dict(first_conv="patch_embed.proj", classifier="head")


def _cfg(hf_hub_id: str, hf_hub_filename: str, top1: float, top5: float, pool_size=(14, 14), **kwargs) -> dict:
    # Evaluation transform of the official datasets.py: resize to 224 / 0.875 (bicubic), centre crop.
    # pool_size: the patch grid at 224 (patch 16, stride 16; the stride-8 entries pass (27, 27)).
    return dict(
        hf_hub_id=hf_hub_id, hf_hub_filename=hf_hub_filename, num_classes=1000, input_size=(3, 224, 224),
        mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, crop_pct=0.875, interpolation="bicubic",
        license="Apache-2.0", paper=_PAPER, source=_SOURCE,
        metrics={"imagenet_top1": top1, "imagenet_top5": top5}, pool_size=pool_size, **_HEAD_CFG, **kwargs,
    )


# Files and ImageNet-1k accuracies: the "Model Weights" table of the hustvl/Vim README.
register_pretrained_cfgs({
    "vim_tiny.in1k": _cfg("hustvl/Vim-tiny-midclstok", "vim_t_midclstok_76p1acc.pth", 76.1, 93.0),
    "vim_small.in1k": _cfg("hustvl/Vim-small-midclstok", "vim_s_midclstok_80p5acc.pth", 80.5, 95.1),
    "vim_base.in1k": _cfg("hustvl/Vim-base-midclstok", "vim_b_midclstok_81p9acc.pth", 81.9, 95.8),
    # "Vim-tiny+ / Vim-small+": the stride-16 models fine-tuned 30 epochs at stride 8 (vim/scripts/ft-vim-*.sh).
    "vim_tiny_stride8.in1k": _cfg("hustvl/Vim-tiny-midclstok", "vim_t_midclstok_ft_78p3acc.pth", 78.3, 94.2, pool_size=(27, 27)),
    "vim_small_stride8.in1k": _cfg("hustvl/Vim-small-midclstok", "vim_s_midclstok_ft_81p6acc.pth", 81.6, 95.4, pool_size=(27, 27)),
})

# Trained here (configs/pretrained/vim_tiny.digits.yaml): the README's main job, `zoo finetune` from scratch on
# scikit-learn's digits at 32x32; shipped as float16 package data. Measured numbers: model_cards/vim_tiny.md.
register_pretrained_cfgs({
    "vim_tiny.digits": dict(
        file="weights/vim_tiny.digits.safetensors",
        sha256="4604d25577845da2e72bc17f3a2e6620863b529a14397043064adb9b1fb26c96",
        num_classes=10, input_size=(3, 32, 32), mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, crop_pct=1.0,
        interpolation="bilinear", license="Apache-2.0", paper=_PAPER, source="mamba-zoo", pool_size=(4, 4), **_HEAD_CFG,
        model_kwargs=dict(img_size=32, patch_size=8, stride=8, depth=6, num_classes=10, drop_path_rate=0.0),
        notes="Trained from scratch on scikit-learn's 8x8 digits upsampled to 32x32 (zoo finetune, 6 epochs).",
    ),
})


class PatchEmbed(nn.Module):
    """Image (b, c, h, w) -> patch tokens (b, n, d) and the grid (gh, gw); patches may overlap
    (stride < patch), so a side of length s gives (s - patch) // stride + 1 patches."""

    def __init__(self, img_size=224, patch_size=16, stride=16, in_chans: int = 3, embed_dim: int = 192):
        super().__init__()
        self.patch_size = to_2tuple(patch_size)
        self.stride = to_2tuple(stride)
        self.img_size = to_2tuple(img_size)
        self.grid_size = self.grid_for(self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.stride)

    def grid_for(self, size: Sequence[int]) -> Tuple[int, int]:
        grid = []
        for side, s, p, st in zip(("height", "width"), size, self.patch_size, self.stride):
            if s < p or (s - p) % st:
                below = max(p, p + (s - p) // st * st)
                raise ValueError(
                    f"VisionMamba: image {side} must be {p} + k * {st} (patch {p}, stride {st}), "
                    f"e.g. {below} or {below + st}; got {s}"
                )
            grid.append((s - p) // st + 1)
        return tuple(grid)

    def forward(self, x: torch.Tensor):
        if x.dim() != 4 or x.shape[1] != self.proj.in_channels:
            raise ValueError(
                f"VisionMamba: expected images of shape (batch, {self.proj.in_channels}, height, width), "
                f"got {tuple(x.shape)}"
            )
        check_input_dtype("VisionMamba", x, self.proj.weight)
        grid = self.grid_for(x.shape[-2:])
        return self.proj(x).flatten(2).transpose(1, 2), grid


def resample_pos_embed(
    pos_embed: torch.Tensor, new_grid: Sequence[int], old_grid: Sequence[int], interpolation: str = "bicubic"
) -> torch.Tensor:
    """(1, 1 + old_h * old_w, d) with the class token's slot in the middle (index old_h * old_w // 2)
    -> (1, 1 + new_h * new_w, d) with it at new_h * new_w // 2; patch positions are resampled in 2-D.

    No antialiasing, as the official fine-tuning script's F.interpolate; in the embedding's own dtype (timm's
    resample_abs_pos_embed would round float64 to float32).
    """
    if tuple(new_grid) == tuple(old_grid):
        return pos_embed
    mid = old_grid[0] * old_grid[1] // 2
    cls_pos = pos_embed[:, mid : mid + 1]
    patches = torch.cat([pos_embed[:, :mid], pos_embed[:, mid + 1 :]], dim=1)
    d = patches.shape[-1]
    grid = patches.reshape(1, old_grid[0], old_grid[1], d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_grid), mode=interpolation, align_corners=False)
    patches = grid.permute(0, 2, 3, 1).reshape(1, -1, d)
    mid = new_grid[0] * new_grid[1] // 2
    return torch.cat([patches[:, :mid], cls_pos, patches[:, mid:]], dim=1)


class VisionMamba(nn.Module):
    """Vim with a middle class token. Keyword names follow the official VisionMamba where they
    exist (``channels`` there is ``in_chans`` here, as in timm)."""

    def __init__(
        self,
        img_size=224,
        patch_size=16,
        stride=16,
        depth: int = 24,
        embed_dim: int = 192,
        d_state: int = 16,
        d_conv: int = 4,
        expand: float = 2,
        in_chans: int = 3,
        num_classes: int = 1000,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        norm_epsilon: float = 1e-5,
        residual_in_fp32: bool = True,
        mixer: str = "bimamba",
        mixer_cfg: Optional[dict] = None,
        layer_shuffle: float = 0.0,
    ):
        """``mixer``: the block's mixer by name (``zoo.core.mixers.MIXERS``; "bimamba" is the official Vim's,
        "bimamba2", "hydra", ... build Vim with Mamba-2 / Hydra blocks); ``mixer_cfg``: its other arguments
        (e.g. ``{"headdim": 32}``). ``layer_shuffle``: the last block's probability of the stochastic layer-wise
        token shuffle in training (ShuffleMamba, ``zoo.core.shuffle``; 0: off)."""
        super().__init__()
        check_mixer("VisionMamba", mixer)
        check_sizes("VisionMamba", depth=depth, embed_dim=embed_dim, in_chans=in_chans)
        for name, value in (("img_size", img_size), ("patch_size", patch_size), ("stride", stride)):
            for side in to_2tuple(value):
                check_int(f"VisionMamba: {name}", side, 1)
        check_num_classes("VisionMamba", num_classes)
        check_rates("VisionMamba", drop_rate=drop_rate, drop_path_rate=drop_path_rate)
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.residual_in_fp32 = residual_in_fp32
        self.grad_checkpointing = False
        self.shuffle_rates = layer_shuffle_rates(depth, layer_shuffle)

        self.patch_embed = PatchEmbed(img_size, patch_size, stride, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)

        # Official schedule: block i drops the output of block i - 1 with rate inter_dpr[i]
        # (block 0 has nothing to drop); the final add before norm_f uses the full rate.
        dpr = [0.0] + torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.layers = nn.ModuleList([
            ResidualBlock(
                embed_dim,
                create_mixer(mixer, embed_dim, d_state, d_conv, expand, layer_idx=i, divide_out=True, mixer_cfg=mixer_cfg),
                RMSNorm(embed_dim, eps=norm_epsilon),
                drop_path=dpr[i],
                residual_in_fp32=residual_in_fp32,
            )
            for i in range(depth)
        ])
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.norm_f = RMSNorm(embed_dim, eps=norm_epsilon)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        # One single-scale token map per block, as timm's ViT.
        reduction = self.patch_embed.stride[0]
        self.feature_info = [dict(num_chs=embed_dim, reduction=reduction, module=f"layers.{i}") for i in range(depth)]

        # Official order: ViT-style init of stem and head, then mamba-ssm's init over everything.
        lecun_normal_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        self._init_head()
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(partial(init_mamba_weights, n_layer=depth))

    def _init_head(self) -> None:
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    @torch.jit.ignore
    def no_weight_decay(self):
        # The official set. A_log and D carry mamba-ssm's _no_weight_decay mark, but the official
        # training (timm's create_optimizer) decays A_log and spares D only for being 1-D.
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(
            stem=r"^cls_token|^pos_embed|^patch_embed",
            blocks=r"^layers\.(\d+)" if coarse else [(r"^layers\.(\d+)", None), (r"^norm_f", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool=None) -> None:
        if global_pool not in (None, "token"):
            raise ValueError(f"VisionMamba: global_pool must be 'token' (the middle class token), got {global_pool!r}")
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self._init_head()

    def _pos_embed(self, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        mid = x.shape[1] // 2
        x = torch.cat([x[:, :mid], self.cls_token.expand(x.shape[0], -1, -1), x[:, mid:]], dim=1)
        return self.pos_drop(x + resample_pos_embed(self.pos_embed, grid, self.patch_embed.grid_size))

    def _run_layer(self, i: int, x: torch.Tensor, residual: Optional[torch.Tensor]):
        layer = self.layers[i]
        if self.grad_checkpointing and not torch.jit.is_scripting():
            run = lambda x, residual: checkpoint(layer, x, residual, use_reentrant=False)  # noqa: E731
        else:
            run = layer
        return shuffled(run, x, residual, prob=self.shuffle_rates[i], training=self.training)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """Token maps after the blocks ``indices`` picks (an int: the last n; None: all), as timm's ViT.

        The map of block i is the residual stream after it (the block's input stream plus its mixer
        output; stochastic depth, an identity in eval, is not applied to it), with the middle class token
        removed: (b, d, gh, gw) for "NCHW", (b, gh * gw, d) for "NLC". ``norm`` applies norm_f to every
        map. Returns the maps, or (forward_features' tokens, maps); for block depth - 1 with ``norm`` in
        eval, the map is those tokens without the class token.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"VisionMamba: output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        layers = self.layers[: max_index + 1] if stop_early and not torch.jit.is_scripting() else self.layers
        tokens, grid = self.patch_embed(x)
        hidden, residual = self._pos_embed(tokens, grid), None
        intermediates = []
        for i in range(len(layers)):
            hidden, residual = self._run_layer(i, hidden, residual)
            if i in take_indices:
                stream = residual + hidden  # what the next block's add computes
                feat = (self.norm_f(stream) if norm else stream).to(hidden.dtype)
                mid = (feat.shape[1] - 1) // 2  # the class token's slot n // 2 in a 1 + n sequence
                feat = torch.cat([feat[:, :mid], feat[:, mid + 1:]], dim=1)
                if output_fmt == "NCHW":
                    feat = feat.transpose(1, 2).reshape(feat.shape[0], -1, *grid).contiguous()
                intermediates.append(feat)
        if intermediates_only:
            return intermediates
        hidden, _ = add_norm(hidden, residual, self.norm_f, self.drop_path, self.residual_in_fp32)
        return hidden, intermediates

    def prune_intermediate_layers(
        self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> List[int]:
        """Drop the blocks after the last of ``indices`` (and norm_f / the head when asked); returns the
        absolute indices."""
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[: max_index + 1]
        if prune_norm:
            self.norm_f = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (b, c, h, w) -> normed tokens (b, 1 + n, d), class token at index n // 2."""
        x = self._pos_embed(*self.patch_embed(x))
        residual = None
        for i in range(len(self.layers)):
            x, residual = self._run_layer(i, x, residual)
        x, _ = add_norm(x, residual, self.norm_f, self.drop_path, self.residual_in_fp32)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, (x.shape[1] - 1) // 2]  # the middle class token of a 1 + n sequence
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _square_grid(num_patches: int) -> Tuple[int, int]:
    side = round(num_patches**0.5)
    if side * side != num_patches:
        raise ValueError(
            f"Vim checkpoint: pos_embed holds {num_patches} patch positions (plus the class token), "
            "not a square grid; cannot infer its grid"
        )
    return side, side


def checkpoint_filter_fn(state_dict: dict, model: VisionMamba) -> dict:
    """An official hustvl/Vim checkpoint (``{"model": state_dict, ...}`` as main.py saves it, or
    the bare state dict) -> a state dict for ``model``.

    Keys map by name. Adaptations, all by shape: ``pos_embed`` resampled to the model's grid (the
    checkpoint's grid is taken as square, class token slot in the middle); patch kernels resampled
    to another patch size; ``head.*`` of another number of classes replaced by the model's own
    freshly initialised head (so strict loading still passes), and dropped when the model has no
    head (``num_classes=0``). Any other key is passed through, so strict loading reports it.
    """
    if "model" in state_dict:
        state_dict = state_dict["model"]
    own = model.state_dict()
    out = {}
    for k, v in state_dict.items():
        if k == "pos_embed" and v.shape[1] != own[k].shape[1]:
            v = resample_pos_embed(v, model.patch_embed.grid_size, _square_grid(v.shape[1] - 1))
        elif k == "patch_embed.proj.weight" and v.shape[-2:] != own[k].shape[-2:]:
            v = resample_patch_embed(v, list(own[k].shape[-2:]))
        elif k.startswith("head."):
            if k not in own:
                continue
            if v.shape != own[k].shape:
                v = own[k]
        out[k] = v
    return out


def _create(variant: str, pretrained: bool, cfg: dict, kwargs: dict) -> VisionMamba:
    return build_model(VisionMamba, variant, pretrained, checkpoint_filter_fn=checkpoint_filter_fn, **{**cfg, **kwargs})


@register_model
def vim_tiny(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-Ti: embed 192, depth 24, patch 16 (7M params)."""
    return _create("vim_tiny", pretrained, dict(embed_dim=192), kwargs)


@register_model
def vim_small(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-S: embed 384, depth 24, patch 16 (26M params)."""
    return _create("vim_small", pretrained, dict(embed_dim=384), kwargs)


@register_model
def vim_base(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-B: embed 768, depth 24, patch 16 (98M params)."""
    return _create("vim_base", pretrained, dict(embed_dim=768), kwargs)


@register_model
def vim_tiny_stride8(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-Ti+: Vim-Ti with 16x16 patches at stride 8 (27x27 = 729 patches at 224)."""
    return _create("vim_tiny_stride8", pretrained, dict(embed_dim=192, stride=8), kwargs)


@register_model
def vim_small_stride8(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-S+: Vim-S with 16x16 patches at stride 8 (27x27 = 729 patches at 224)."""
    return _create("vim_small_stride8", pretrained, dict(embed_dim=384, stride=8), kwargs)
