"""VMamba (Liu et al., NeurIPS 2024): the released "v2" models of MzeroMiko/VMamba.

Stem ("v2" patch embed: two 3x3 stride-2 convolutions with LayerNorm and GELU between) -> four stages of
VSS blocks (x + drop_path(SS2D(LN(x))); x + drop_path(MLP(LN(x)))), each later stage entered through the
"v3" downsample (3x3 stride-2 convolution + LayerNorm) -> LayerNorm -> global average pool -> linear head.

SS2D with the "v05_noz" forward of the released configs: in_proj (no gate branch) -> depthwise 3x3 conv
-> SiLU -> four selective scans of the same H x W map in the cross-scan orders (row-major, column-major,
and both reversed), each direction with its own x_proj / dt_proj / A / D -> the four outputs summed at
their image positions (cross-merge) -> LayerNorm (out_norm) -> out_proj. d_state is 1 in all released
models.

Differences from the official code (forward and checkpoints are unaffected):
- Activations are channels-last (b, h, w, c) with nn.Linear / nn.LayerNorm where the official
  "ln2d" models run channels-first with 1x1 convolutions and a permuting LayerNorm: the same maps.
- The official code computes x_proj / dt_proj on four cross-scanned copies of the map (transposed and
  flipped); these are per-token projections, so here they run once on the row-major map for all four
  directions, and each direction's scan visits the tokens in its own order (``cross_scan``, the core's
  multi-direction scan): the outputs land at their image positions and cross-merge is a sum.
- Precision: as the official v05 forward (force_fp32 off), A, D and the dt bias are taken in float32 and the
  scan inputs in the autocast dtype; norms run as plain LayerNorm (float32 under autocast), there is no
  separate residual stream. One difference: the scan output keeps the input dtype before out_norm (the
  official CUDA kernel returns float32), and out_norm's output is not cast back to the input dtype before
  out_proj (which autocasts it anyway); identical in float32, a rounding-level difference under
  float16/bfloat16 autocast. The official trainer uses float16 autocast (AMP_ENABLE), zoo's engine bfloat16.
  float64 runs unrounded (the official ``.to(torch.float)`` casts are ``upcast`` here).
- Stages are laid out as timm's hierarchical models: the downsample that the official code keeps at the
  end of stage i is the start of stage i + 1 here, so ``stages.i`` outputs the stage-i feature map.
  ``checkpoint_filter_fn`` renames the official keys accordingly.
"""
from __future__ import annotations

import math
import re
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models._features import feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

from zoo.core.checks import check_float, check_input_dtype, check_int, check_ints, check_num_classes, check_rates, check_sizes
from zoo.core.mamba import make_A_log, make_D, make_dt_proj
from zoo.core.precision import upcast
from zoo.core.selective_scan import selective_scan_multi
from zoo.registry import build_model, register_model, register_pretrained_cfgs

__all__ = [
    "VMamba", "SS2D", "VSSBlock", "HierarchicalBackbone", "Stage", "cross_scan", "cross_merge", "checkpoint_filter_fn",
]

_PAPER = "VMamba: Visual State Space Model (Liu et al., NeurIPS 2024, arXiv:2401.10166)"
_SOURCE = "https://github.com/MzeroMiko/VMamba"
_RELEASE = "https://github.com/MzeroMiko/VMamba/releases/download/%23v2cls/"


def _cfg(file: str, top1: float, config: str, **kwargs) -> dict:
    # No sha256: the release files cannot be downloaded where this zoo is built (resolve_source checks one on
    # download and on load once it is registered). Evaluation transform of the official data/build.py: resize to 256/224 of the crop (bicubic), centre crop.
    return dict(
        url=_RELEASE + file, num_classes=1000, input_size=(3, 224, 224), mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD, crop_pct=0.875, interpolation="bicubic", license="MIT", paper=_PAPER,
        source=_SOURCE, metrics={"imagenet_top1": top1},
        notes=f"official config classification/configs/vssm/{config}; weights under the checkpoint's 'model' key",
        first_conv="patch_embed.conv1", classifier="head", pool_size=(7, 7),  # the stem timm adapts, the head; 224 / 32
        **kwargs,
    )


# Files and ImageNet-1k top-1: the classification table of the MzeroMiko/VMamba README / assets/performance.md.
register_pretrained_cfgs({
    "vmamba_tiny.in1k": _cfg("vssm1_tiny_0230s_ckpt_epoch_264.pth", 82.6, "vmambav2v_tiny_224.yaml"),
    "vmamba_small.in1k": _cfg("vssm_small_0229_ckpt_epoch_222.pth", 83.6, "vmambav2_small_224.yaml"),
    "vmamba_base.in1k": _cfg("vssm_base_0229_ckpt_epoch_237.pth", 83.9, "vmambav2_base_224.yaml"),
    "vmamba_tiny_s2l5.in1k": _cfg("vssm_tiny_0230_ckpt_epoch_262.pth", 82.5, "vmambav2_tiny_224.yaml"),
    "vmamba_small_s1l20.in1k": _cfg("vssm1_small_0229s_ckpt_epoch_240.pth", 83.3, "vmambav2v_small_224.yaml"),
    "vmamba_base_s1l20.in1k": _cfg("vssm1_base_0229s_ckpt_epoch_225.pth", 83.8, "vmambav2v_base_224.yaml"),
})

# The four scan directions, in the order of the official per-direction parameters (k = 0..3): row-major,
# column-major, row-major reversed, column-major reversed. Names as the core's multi-direction scan.
DIRECTIONS = ("forward", "forward_t", "reverse", "reverse_t")


def cross_scan(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor, delta_bias: torch.Tensor, hw: Tuple[int, int],
) -> torch.Tensor:
    """The four selective scans of an H x W map, one per direction of ``DIRECTIONS``, through the core's
    multi-direction scan (one kernel launch on the GPU, no flipped or transposed copies).

    Every per-token tensor is indexed by row-major image position, whatever the direction; only the
    order in which direction k runs its recurrence differs. u: (b, H*W, d) shared by all directions;
    delta: (4, b, H*W, d); A: (4, d, n); B, C: (4, b, H*W, n); D, delta_bias: (4, d). Returns the
    outputs (4, b, H*W, d), also at row-major positions; softplus is applied to delta + delta_bias.
    """
    return selective_scan_multi(
        u, delta, A, B, C, D=D, delta_bias=delta_bias, delta_softplus=True, directions=DIRECTIONS, hw=hw
    )


def cross_merge(ys: torch.Tensor) -> torch.Tensor:
    """(4, b, L, d) direction outputs at row-major positions -> their sum (b, L, d)."""
    return ys.sum(0)


class SS2D(nn.Module):
    """2-D selective scan mixer, "v05_noz" form; (b, h, w, d_model) -> (b, h, w, d_model).

    Parameter names and shapes are the official ones: x_proj_weight (4, dt_rank + 2 d_state, d_inner),
    dt_projs_weight (4, d_inner, dt_rank), dt_projs_bias (4, d_inner), A_logs (4 d_inner, d_state),
    Ds (4 d_inner).
    """

    K = 4

    def __init__(
        self,
        d_model: int,
        d_state: int = 1,
        ssm_ratio: float = 2.0,
        dt_rank: Union[int, str] = "auto",
        d_conv: int = 3,
        conv_bias: bool = False,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
    ):
        super().__init__()
        if d_conv % 2 != 1:
            raise ValueError(f"SS2D: d_conv must be odd (a 'same'-padded depthwise conv), got {d_conv}")
        self.d_state = d_state
        self.d_inner = d_inner = int(ssm_ratio * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.in_proj = nn.Linear(d_model, d_inner, bias=False)
        self.conv2d = nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner, bias=conv_bias)
        self.act = nn.SiLU()
        # Initialised as the official stack of four fresh nn.Linear weights (PyTorch's default init).
        bound = d_inner**-0.5
        self.x_proj_weight = nn.Parameter(
            torch.empty(self.K, self.dt_rank + 2 * d_state, d_inner).uniform_(-bound, bound)
        )
        dt_projs = [
            make_dt_proj(self.dt_rank, d_inner, dt_min, dt_max, dt_init, dt_scale, dt_init_floor, {})
            for _ in range(self.K)
        ]
        self.dt_projs_weight = nn.Parameter(torch.stack([p.weight.detach() for p in dt_projs]))
        self.dt_projs_bias = nn.Parameter(torch.stack([p.bias.detach() for p in dt_projs]))
        self.A_logs = make_A_log(self.K * d_inner, d_state, None)
        self.Ds = make_D(self.K * d_inner, None)
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_proj(x)
        x = self.act(self.conv2d(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)
        b, h, w, d = x.shape
        K, R, N = self.K, self.dt_rank, self.d_state
        u = x.reshape(b, h * w, d)
        # The four directions' x_proj in one matmul: (b, L, K * (R + 2N)) -> (K, b, L, R + 2N).
        x_dbl = F.linear(u, self.x_proj_weight.reshape(-1, d)).unflatten(-1, (K, -1)).movedim(2, 0)
        dts, Bs, Cs = x_dbl.split([R, N, N], dim=-1)
        dts = torch.einsum("kblr,kdr->kbld", dts, self.dt_projs_weight)
        A = -upcast(self.A_logs).exp().view(K, d, N)
        ys = cross_scan(u, dts, A, Bs, Cs, upcast(self.Ds).view(K, d), upcast(self.dt_projs_bias), (h, w))
        y = cross_merge(ys).view(b, h, w, d)
        return self.out_proj(self.out_norm(y))


class VSSBlock(nn.Module):
    """x + drop_path(SS2D(LN(x))), then x + drop_path(MLP(LN(x))); channels-last (b, h, w, c)."""

    def __init__(self, dim: int, drop_path: float = 0.0, mlp_ratio: float = 4.0, **ssm_kwargs):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.op = SS2D(dim, **ssm_kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.op(self.norm(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """"v2" stem: conv 3x3/2 -> LN -> GELU -> conv 3x3/2 -> LN. (b, c, H, W) -> (b, ceil(H/4), ceil(W/4), dim)
    for patch size 4 (each convolution halves a side, rounding up)."""

    def __init__(self, in_chans: int = 3, embed_dim: int = 96, patch_size: int = 4):
        super().__init__()
        if patch_size < 2 or patch_size % 2:
            raise ValueError(f"VMamba: the v2 patch embed needs an even patch_size >= 2, got {patch_size}")
        stride = patch_size // 2
        self.in_chans = in_chans
        self.conv1 = nn.Conv2d(in_chans, embed_dim // 2, stride + 1, stride, padding=1)
        self.norm1 = nn.LayerNorm(embed_dim // 2)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(embed_dim // 2, embed_dim, stride + 1, stride, padding=1)
        self.norm2 = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"VMamba: expected images (batch, {self.in_chans}, height, width), got {tuple(x.shape)}")
        check_input_dtype("VMamba", x, self.conv1.weight)
        x = self.act(self.norm1(self.conv1(x).permute(0, 2, 3, 1)))
        return self.norm2(self.conv2(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class Downsample(nn.Module):
    """"v3" downsample: conv 3x3/2 (padding 1) -> LN; (b, h, w, c) -> (b, ceil(h/2), ceil(w/2), out_dim)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, out_dim, 3, 2, padding=1)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class Stage(nn.Module):
    """Downsample (or identity), then blocks, on channels-last maps; ``channels_first`` runs the blocks on
    (b, c, h, w) (convolutional blocks)."""

    def __init__(self, downsample: nn.Module, blocks: Sequence[nn.Module], channels_first: bool = False):
        super().__init__()
        self.grad_checkpointing = False
        self.channels_first = channels_first
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.channels_first:
            x = x.permute(0, 3, 1, 2)
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x.permute(0, 2, 3, 1) if self.channels_first else x


def drop_path_rates(depths: Sequence[int], rate: float) -> List[List[float]]:
    """Per stage, the stochastic-depth rates of its blocks: linear from 0 to ``rate`` over all blocks
    (computed in Python, so models also build on the meta device)."""
    total = sum(depths)
    rates = [rate * i / max(total - 1, 1) for i in range(total)]
    return [rates[sum(depths[:i]):sum(depths[:i + 1])] for i in range(len(depths))]


def stage_dims(dims: Union[int, Sequence[int]], depths: Sequence[int], name: str) -> List[int]:
    """``dims`` as one width per stage; an int is the first stage's width, doubled per stage."""
    check_ints(f"{name}: depths", depths, 1)
    if isinstance(dims, int):
        check_int(f"{name}: dims", dims, 1)
    dims = [dims * 2**i for i in range(len(depths))] if isinstance(dims, int) else check_ints(f"{name}: dims", list(dims), 1)
    if len(dims) != len(depths):
        raise ValueError(f"{name}: one width per stage expected, got dims={dims} for depths={list(depths)}")
    return dims


class HierarchicalBackbone(nn.Module):
    """The timm interface of a multi-stage backbone on channels-last maps. Subclasses build ``patch_embed``
    (images -> (b, h, w, c)), ``stages`` (an nn.Sequential of ``Stage``) and ``feature_info``; this base
    holds the final LayerNorm, average pooling and the linear head."""

    output_fmt = "NHWC"

    def __init__(self, num_features: int, num_classes: int, global_pool: str, drop_rate: float):
        super().__init__()
        self._check_pool(global_pool)
        check_num_classes(type(self).__name__, num_classes)
        check_rates(type(self).__name__, drop_rate=drop_rate)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = num_features
        self.norm = nn.LayerNorm(num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _check_pool(self, global_pool: str) -> None:
        if global_pool not in ("avg", ""):
            raise ValueError(f"{type(self).__name__}: global_pool must be 'avg' or '' (none), got {global_pool!r}")

    @torch.jit.ignore
    def no_weight_decay(self):
        # The official optimizer decays every parameter with more than one dimension whose name does not end in
        # ".bias" (so A_logs and dt_projs_bias are decayed); timm's param groups do the same with an empty set.
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(
            stem=r"^patch_embed",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            self._check_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.head.apply(init_weights)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """Stage outputs as timm's hierarchical models: ``indices`` picks stages (an int: the last n);
        ``norm`` applies the final norm to the last stage's map. Returns the (b, c, h, w) maps, or
        (final features, maps)."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"{type(self).__name__}: output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last = len(self.stages) - 1
        stages = self.stages[: max_index + 1] if stop_early and not torch.jit.is_scripting() else self.stages
        intermediates = []
        x = self.patch_embed(x)
        i = 0
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                feat = self.norm(x) if norm and i == last else x
                intermediates.append(feat.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else feat)
        if intermediates_only:
            return intermediates
        return (self.norm(x) if i == last else x), intermediates

    def prune_intermediate_layers(
        self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[: max_index + 1]
        if prune_norm or prune_end:
            self.norm = nn.Identity()  # sized for the last stage only
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (b, c, H, W) -> normed last-stage map (b, h, w, c), channels-last as timm's Swin."""
        return self.norm(self.stages(self.patch_embed(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class VMamba(HierarchicalBackbone):
    """VMamba ("v2" stem, "v3" downsample, "v05_noz" SS2D). Keyword names follow the official VSSM
    (``dims`` may be an int: the first stage's width, doubled per stage)."""

    def __init__(
        self,
        depths: Sequence[int] = (2, 2, 8, 2),
        dims: Union[int, Sequence[int]] = 96,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        ssm_d_state: int = 1,
        ssm_ratio: float = 1.0,
        ssm_dt_rank: Union[int, str] = "auto",
        ssm_conv: int = 3,
        ssm_conv_bias: bool = False,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
    ):
        check_sizes("VMamba", in_chans=in_chans, ssm_d_state=ssm_d_state, ssm_conv=ssm_conv)
        check_float("VMamba: ssm_ratio", ssm_ratio, 0, low_open=True)
        check_float("VMamba: mlp_ratio", mlp_ratio, 0)
        check_rates("VMamba", drop_path_rate=drop_path_rate)
        dims = stage_dims(dims, depths, "VMamba")
        super().__init__(dims[-1], num_classes, global_pool, drop_rate)
        self.dims = dims
        self.patch_embed = PatchEmbed(in_chans, dims[0], patch_size)
        ssm_kwargs = dict(
            d_state=ssm_d_state, ssm_ratio=ssm_ratio, dt_rank=ssm_dt_rank, d_conv=ssm_conv, conv_bias=ssm_conv_bias,
        )
        self.stages = nn.Sequential(*[
            Stage(
                Downsample(dims[i - 1], dims[i]) if i > 0 else nn.Identity(),
                [VSSBlock(dims[i], rate, mlp_ratio=mlp_ratio, **ssm_kwargs) for rate in rates],
            )
            for i, rates in enumerate(drop_path_rates(depths, drop_path_rate))
        ])
        self.feature_info = [
            dict(num_chs=dims[i], reduction=patch_size * 2**i, module=f"stages.{i}") for i in range(len(depths))
        ]
        self.apply(init_weights)


def init_weights(m: nn.Module) -> None:
    """Official VSSM._init_weights (also EfficientVMamba's): truncated-normal linear layers with zero bias,
    unit LayerNorms; convolutions and the SS2D parameters keep their own init."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# Official key -> ours (see the module docstring): the numbered nn.Sequential entries of the stem and the
# downsample get names, downsamples move to the start of the next stage, the classifier's norm and head
# move to the top level.
_KEY_RULES = (
    (re.compile(r"^patch_embed\.0\."), lambda m: "patch_embed.conv1."),
    (re.compile(r"^patch_embed\.2\."), lambda m: "patch_embed.norm1."),
    (re.compile(r"^patch_embed\.5\."), lambda m: "patch_embed.conv2."),
    (re.compile(r"^patch_embed\.7\."), lambda m: "patch_embed.norm2."),
    (re.compile(r"^layers\.(\d+)\.blocks\."), lambda m: f"stages.{m[1]}.blocks."),
    (re.compile(r"^layers\.(\d+)\.downsample\.1\."), lambda m: f"stages.{int(m[1]) + 1}.downsample.conv."),
    (re.compile(r"^layers\.(\d+)\.downsample\.3\."), lambda m: f"stages.{int(m[1]) + 1}.downsample.norm."),
    (re.compile(r"^classifier\.norm\."), lambda m: "norm."),
    (re.compile(r"^classifier\.head\."), lambda m: "head."),
)


def _rename(key: str) -> str:
    for pattern, repl in _KEY_RULES:
        m = pattern.match(key)
        if m:
            return repl(m) + key[m.end():]
    return key


def checkpoint_filter_fn(state_dict: dict, model: VMamba) -> dict:
    """An official MzeroMiko/VMamba classification checkpoint (``{"model": state_dict, ...}`` as its
    main.py saves it, or the bare state dict) -> a state dict for ``model``.

    Keys are renamed (``_KEY_RULES``); a state dict already in this layout passes unchanged. ``head.*`` of
    another number of classes is replaced by the model's own freshly initialised head (strict loading still
    passes) and dropped when the model has no head. Anything else passes through, so strict loading
    reports keys that do not belong.
    """
    if "model" in state_dict:
        state_dict = state_dict["model"]
    own = model.state_dict()
    out = {}
    for key, value in state_dict.items():
        key = _rename(key)
        if key.startswith("head."):
            if key not in own:
                continue
            if value.shape != own[key].shape:
                value = own[key]
        out[key] = value
    return out


def _create(variant: str, pretrained: bool, cfg: dict, kwargs: dict):
    return build_model(VMamba, variant, pretrained, checkpoint_filter_fn=checkpoint_filter_fn, **{**cfg, **kwargs})


@register_model
def vmamba_tiny(pretrained: bool = False, **kwargs):
    """VMamba-T [s1l8]: dims 96, depths 2-2-8-2, ssm_ratio 1 (30M params, 4.9 GFLOPs)."""
    cfg = dict(depths=(2, 2, 8, 2), dims=96, ssm_ratio=1.0, drop_path_rate=0.2)
    return _create("vmamba_tiny", pretrained, cfg, kwargs)


@register_model
def vmamba_small(pretrained: bool = False, **kwargs):
    """VMamba-S [s2l15]: dims 96, depths 2-2-15-2, ssm_ratio 2 (50M params, 8.7 GFLOPs)."""
    cfg = dict(depths=(2, 2, 15, 2), dims=96, ssm_ratio=2.0, drop_path_rate=0.3)
    return _create("vmamba_small", pretrained, cfg, kwargs)


@register_model
def vmamba_base(pretrained: bool = False, **kwargs):
    """VMamba-B [s2l15]: dims 128, depths 2-2-15-2, ssm_ratio 2 (89M params, 15.4 GFLOPs)."""
    cfg = dict(depths=(2, 2, 15, 2), dims=128, ssm_ratio=2.0, drop_path_rate=0.6)
    return _create("vmamba_base", pretrained, cfg, kwargs)


@register_model
def vmamba_tiny_s2l5(pretrained: bool = False, **kwargs):
    """VMamba-T [s2l5]: dims 96, depths 2-2-5-2, ssm_ratio 2 (31M params, 4.9 GFLOPs)."""
    cfg = dict(depths=(2, 2, 5, 2), dims=96, ssm_ratio=2.0, drop_path_rate=0.2)
    return _create("vmamba_tiny_s2l5", pretrained, cfg, kwargs)


@register_model
def vmamba_small_s1l20(pretrained: bool = False, **kwargs):
    """VMamba-S [s1l20]: dims 96, depths 2-2-20-2, ssm_ratio 1 (49M params, 8.6 GFLOPs)."""
    cfg = dict(depths=(2, 2, 20, 2), dims=96, ssm_ratio=1.0, drop_path_rate=0.3)
    return _create("vmamba_small_s1l20", pretrained, cfg, kwargs)


@register_model
def vmamba_base_s1l20(pretrained: bool = False, **kwargs):
    """VMamba-B [s1l20]: dims 128, depths 2-2-20-2, ssm_ratio 1 (87M params, 15.2 GFLOPs)."""
    cfg = dict(depths=(2, 2, 20, 2), dims=128, ssm_ratio=1.0, drop_path_rate=0.5)
    return _create("vmamba_base_s1l20", pretrained, cfg, kwargs)
