"""S-Mamba: "Is Mamba Effective for Time Series Forecasting?" (Wang et al., Neurocomputing 2024).

Each variate's look-back window (length ``seq_len``) is embedded by one Linear layer as a token; a
stack of encoder layers mixes the variate tokens with two Mambas (one over the tokens in order, one
over them flipped, outputs summed), then a position-wise feed-forward network; a Linear projection maps
every token to the ``pred_len`` future values. Inputs are normalised per instance and variate over the
look-back window and the forecast is de-normalised with the same statistics (RevIN without affine).

Optional timestamp covariates ``x_mark`` (batch, seq_len, n_marks) become extra tokens, as in the
official code; their outputs are dropped. The token embedding does not depend on the number of
variates, so one model accepts any number of them unless ``enc_in`` pins it.

Parameter names are the zoo's; ``checkpoint_filter_fn`` converts a state dict of the official
``model/S_Mamba.py`` (wzhwzhwzh0921/S-D-Mamba). No weights are released upstream, so the entries
carry the published hyper-parameters per data set and horizon, not weights.
"""
from __future__ import annotations

import re
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from zoo.core.checks import check_int, check_num_classes, check_rates, check_sizes
from zoo.core.mixers import check_mixer, create_mixer
from zoo.core.shuffle import layer_shuffle_rates, shuffled
from zoo.registry import build_model, register_model, register_pretrained_cfgs

from .common import ClassifierModel, ForecasterModel

__all__ = ["SMamba", "SMambaClassifier", "SMambaEncoder", "SMambaLayer", "checkpoint_filter_fn", "instance_norm"]

_PAPER = "Is Mamba Effective for Time Series Forecasting? (Wang et al., Neurocomputing 2024, arXiv:2403.11144)"
_SOURCE = "https://github.com/wzhwzhwzh0921/S-D-Mamba"
UNIDIRECTIONAL = ("mamba", "mamba2")  # each direction of S-Mamba is its own causal mixer


def instance_norm(x: torch.Tensor, eps: float = 1e-5):
    """Per-instance, per-variate normalisation over time, (b, l, n) -> (normalised, mean, std).

    The statistics are detached, as in the official code (Non-stationary Transformer's normalisation)."""
    mean = x.mean(1, keepdim=True).detach()
    x = x - mean
    std = torch.sqrt(x.var(1, keepdim=True, unbiased=False) + eps).detach()
    return x / std, mean, std


class SMambaLayer(nn.Module):
    """x <- LN(x + Mamba(x) + flip(Mamba_r(flip(x)))); x <- LN(x + FFN(x)) over variate tokens (b, n, d).

    The two Mambas are separate instances with d_conv=2, expand=1 (the official setting). ``mixer``: "mamba" (the
    official) or "mamba2" for both directions, ``mixer_cfg`` its other arguments."""

    def __init__(
        self, d_model: int, d_state: int = 32, d_ff: Optional[int] = None, d_conv: int = 2, expand: float = 1,
        dropout: float = 0.1, activation: str = "gelu", mixer: str = "mamba", mixer_cfg: Optional[dict] = None,
    ):
        super().__init__()
        if activation not in ("gelu", "relu"):
            raise ValueError(f"SMambaLayer: activation must be 'gelu' or 'relu', got {activation!r}")
        check_mixer("S-Mamba", mixer, UNIDIRECTIONAL)
        d_ff = d_ff or 4 * d_model
        self.mixer = create_mixer(mixer, d_model, d_state, d_conv, expand, mixer_cfg=mixer_cfg)
        self.mixer_r = create_mixer(mixer, d_model, d_state, d_conv, expand, mixer_cfg=mixer_cfg)
        self.norm1 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)
        self.act = F.gelu if activation == "gelu" else F.relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The backward Mamba reads the token order reversed; no dropout on the mixer output (official).
        x = self.norm1(x + self.mixer(x) + self.mixer_r(x.flip(1)).flip(1))
        y = self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))
        return self.norm2(x + y)


class SMambaEncoder(nn.Module):
    """Variate-token embedding and the bidirectional Mamba encoder: (b, l, n[+marks]) -> (b, n', d).
    ``seq_len`` is the length of one raw token (the window, or a patch for the classifier)."""

    def __init__(
        self, seq_len: int, d_model: int, e_layers: int, d_state: int, d_ff: Optional[int], d_conv: int,
        expand: float, dropout: float, activation: str, mixer: str = "mamba", mixer_cfg: Optional[dict] = None,
        layer_shuffle: float = 0.0,
    ):
        super().__init__()
        check_sizes("S-Mamba", seq_len=seq_len, d_model=d_model, e_layers=e_layers)
        self.shuffle_rates = layer_shuffle_rates(e_layers, layer_shuffle)
        check_int("S-Mamba: d_ff", d_ff, 1, optional=True)
        check_rates("S-Mamba", dropout=dropout)
        self.seq_len = seq_len
        self.embed = nn.Linear(seq_len, d_model)
        self.embed_drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            SMambaLayer(d_model, d_state, d_ff, d_conv, expand, dropout, activation, mixer, mixer_cfg) for _ in range(e_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, x_mark: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x_mark is not None:
            x = torch.cat([x, x_mark.to(x.dtype)], dim=2)  # covariates become extra tokens
        return self.forward_tokens(x.transpose(1, 2))

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(b, tokens, token_len) raw tokens (a variate's window, or a patch of it) -> (b, tokens, d)."""
        x = self.embed_drop(self.embed(tokens))
        for layer, prob in zip(self.layers, self.shuffle_rates):
            if self.grad_checkpointing and torch.is_grad_enabled():
                run = partial(torch.utils.checkpoint.checkpoint, layer, use_reentrant=False)
            else:
                run = layer
            x = shuffled(run, x, prob=prob, training=self.training)
        return self.norm(x)


def _check_input(name: str, x: torch.Tensor, seq_len: int, enc_in: Optional[int], x_mark: Optional[torch.Tensor]):
    if x.dim() != 3 or x.shape[1] != seq_len or (enc_in is not None and x.shape[2] != enc_in):
        n = enc_in if enc_in is not None else "n_variates"
        raise ValueError(f"{name}: expected input of shape (batch, {seq_len}, {n}), got {tuple(x.shape)}")
    if x_mark is not None and (x_mark.dim() != 3 or x_mark.shape[:2] != x.shape[:2]):
        raise ValueError(
            f"{name}: expected x_mark of shape ({x.shape[0]}, {seq_len}, n_marks), got {tuple(x_mark.shape)}"
        )


class SMamba(ForecasterModel):
    """S-Mamba forecaster: (batch, seq_len, n_variates) -> (batch, pred_len, n_variates).

    Defaults are the official run.py defaults (d_model 512, d_ff 2048, d_state 32, 2 layers)."""

    def __init__(
        self,
        seq_len: int = 96,
        pred_len: int = 96,
        enc_in: Optional[int] = None,
        d_model: int = 512,
        d_state: int = 32,
        d_ff: Optional[int] = 2048,
        e_layers: int = 2,
        d_conv: int = 2,
        expand: float = 1,
        dropout: float = 0.1,
        activation: str = "gelu",
        use_norm: bool = True,
        mixer: str = "mamba",
        mixer_cfg: Optional[dict] = None,
        layer_shuffle: float = 0.0,
    ):
        """``layer_shuffle``: the last layer's probability of the stochastic layer-wise shuffle of the variate
        tokens in training (ShuffleMamba, ``zoo.core.shuffle``; 0: off)."""
        super().__init__()
        check_sizes("SMamba", seq_len=seq_len, pred_len=pred_len)
        check_int("SMamba: enc_in", enc_in, 1, optional=True)
        self.seq_len, self.pred_len, self.enc_in, self.use_norm = seq_len, pred_len, enc_in, use_norm
        self.num_features = self.head_hidden_size = d_model
        self.encoder = SMambaEncoder(seq_len, d_model, e_layers, d_state, d_ff, d_conv, expand, dropout, activation,
                                     mixer, mixer_cfg, layer_shuffle)
        self.head = nn.Linear(d_model, pred_len)
        self.pretrained_cfg: dict = {}  # build_model sets the entry's cfg

    def forward_features(self, x: torch.Tensor, x_mark: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Encoded tokens (batch, n_variates + n_marks, d_model) of an already normalised input."""
        return self.encoder(x, x_mark)

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(batch, tokens, d_model) -> (batch, pred_len, tokens); ``pre_logits`` returns the tokens."""
        return tokens if pre_logits else self.head(tokens).transpose(1, 2)

    def forward(self, x: torch.Tensor, x_mark: Optional[torch.Tensor] = None) -> torch.Tensor:
        _check_input(type(self).__name__, x, self.seq_len, self.enc_in, x_mark)
        n = x.shape[2]
        if self.use_norm:
            x, mean, std = instance_norm(x)
        out = self.forward_head(self.forward_features(x, x_mark))[:, :, :n]  # drop the covariate tokens
        return out * std + mean if self.use_norm else out


class SMambaClassifier(ClassifierModel):
    """The S-Mamba encoder for series classification: tokens -> encoder -> mean over tokens -> Linear.
    Input (batch, seq_len, n_variates), output logits (batch, num_classes). Not in the paper: the zoo's
    use of the same encoder for labelled series.

    Tokens are each variate's whole series (``patch_len`` None, S-Mamba's variate tokens), or with
    ``patch_len`` its non-overlapping patches in time order, variate after variate (the end is padded by
    repeating the last value), which gives a univariate series more than one token."""

    def __init__(
        self,
        seq_len: int,
        num_classes: int,
        enc_in: Optional[int] = None,
        d_model: int = 128,
        d_state: int = 16,
        d_ff: Optional[int] = 256,
        e_layers: int = 2,
        d_conv: int = 2,
        expand: float = 1,
        dropout: float = 0.1,
        activation: str = "gelu",
        use_norm: bool = True,
        patch_len: Optional[int] = None,
        mixer: str = "mamba",
        mixer_cfg: Optional[dict] = None,
        layer_shuffle: float = 0.0,
    ):
        """``layer_shuffle``: the last layer's probability of the stochastic layer-wise token shuffle in training
        (ShuffleMamba, ``zoo.core.shuffle``; 0: off)."""
        super().__init__()
        check_sizes("SMambaClassifier", seq_len=seq_len)
        check_num_classes("SMambaClassifier", num_classes)
        check_int("SMambaClassifier: enc_in", enc_in, 1, optional=True)
        if patch_len is not None and not 1 <= patch_len <= seq_len:
            raise ValueError(f"SMambaClassifier: patch_len must be in 1..seq_len={seq_len}, got {patch_len}")
        self.seq_len, self.enc_in, self.use_norm, self.patch_len = seq_len, enc_in, use_norm, patch_len
        self.num_classes, self.num_features = num_classes, d_model
        token_len = patch_len or seq_len
        self.encoder = SMambaEncoder(token_len, d_model, e_layers, d_state, d_ff, d_conv, expand, dropout, activation,
                                     mixer, mixer_cfg, layer_shuffle)
        self.head = nn.Linear(d_model, num_classes) if num_classes > 0 else nn.Identity()
        self.head_hidden_size = d_model
        self.pretrained_cfg: dict = {}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(type(self).__name__, x, self.seq_len, self.enc_in, None)
        if self.use_norm:
            x = instance_norm(x)[0]
        tokens = x.transpose(1, 2)  # (b, n, l)
        if self.patch_len:
            pad = -self.seq_len % self.patch_len
            tokens = F.pad(tokens, (0, pad), mode="replicate") if pad else tokens
            tokens = tokens.reshape(x.shape[0], -1, self.patch_len)  # (b, n * patches, patch_len)
        return self.encoder.forward_tokens(tokens)

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = tokens.mean(1)
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# Official module path -> zoo path. EncoderLayer also builds `man`, `man2` and `a`, never used in forward.
_RENAMES = (
    (r"^enc_embedding\.value_embedding\.", "encoder.embed."),
    (r"^encoder\.attn_layers\.(\d+)\.attention_r\.", r"encoder.layers.\1.mixer_r."),
    (r"^encoder\.attn_layers\.(\d+)\.attention\.", r"encoder.layers.\1.mixer."),
    (r"^encoder\.attn_layers\.(\d+)\.conv1\.", r"encoder.layers.\1.fc1."),
    (r"^encoder\.attn_layers\.(\d+)\.conv2\.", r"encoder.layers.\1.fc2."),
    (r"^encoder\.attn_layers\.(\d+)\.norm([12])\.", r"encoder.layers.\1.norm\2."),
    (r"^encoder\.norm\.", "encoder.norm."),
    (r"^projector\.", "head."),
)
_UNUSED = re.compile(r"^encoder\.attn_layers\.\d+\.(man|man2|a)\.")


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """Convert an official S-Mamba state dict (model/S_Mamba.py) to this implementation's names.

    The FFN's kernel-size-1 Conv1d weights (d_out, d_in, 1) become Linear weights; the unused modules
    are dropped. A state dict already in zoo names passes through."""
    if any(k.startswith("encoder.layers.") for k in state_dict):
        return state_dict
    out = {}
    for key, value in state_dict.items():
        key = key[len("module."):] if key.startswith("module.") else key  # DataParallel prefix
        if _UNUSED.match(key):
            continue
        for pattern, repl in _RENAMES:
            new, n = re.subn(pattern, repl, key)
            if n:
                key = new
                break
        if re.search(r"\.fc[12]\.weight$", key) and value.dim() == 3:
            value = value.squeeze(-1)
        out[key] = value
    return out


# --- entries ---------------------------------------------------------------------------------------------
# Published hyper-parameters, from the official scripts/multivariate_forecasting/<set>/*.sh (look-back 96).
# Per horizon: (d_model = d_ff, e_layers, d_state, learning rate, batch size, epochs); run.py defaults
# where a script leaves a flag out (d_state 32, lr 1e-4, batch 32, 10 epochs, early-stopping patience 3).
_SCRIPTS = {
    "etth1": ("ETT/S_Mamba_ETTh1.sh", 7, True, {
        96: (256, 2, 2, 7e-5, 32, 10), 192: (256, 2, 2, 7e-5, 32, 10), 336: (256, 2, 2, 5e-5, 32, 10),
        720: (256, 2, 2, 5e-5, 32, 10)}),
    "etth2": ("ETT/S_Mamba_ETTh2.sh", 7, True, {
        96: (256, 2, 2, 4e-5, 32, 10), 192: (256, 2, 2, 4e-5, 32, 10), 336: (256, 2, 2, 3e-5, 32, 10),
        720: (256, 2, 2, 7e-5, 32, 10)}),
    "ettm1": ("ETT/S_Mamba_ETTm1.sh", 7, True, {
        96: (256, 2, 2, 5e-5, 32, 10), 192: (128, 2, 2, 5e-5, 32, 10), 336: (128, 2, 2, 5e-5, 32, 10),
        720: (128, 2, 2, 5e-5, 32, 10)}),
    "ettm2": ("ETT/S_Mamba_ETTm2.sh", 7, True, {
        96: (256, 2, 2, 5e-5, 32, 10), 192: (128, 2, 2, 5e-5, 32, 10), 336: (128, 2, 2, 3e-5, 32, 10),
        720: (128, 2, 2, 5e-5, 32, 10)}),
    "electricity": ("ECL/S_Mamba.sh", 321, True, {
        96: (512, 3, 16, 1e-3, 16, 5), 192: (512, 3, 32, 5e-4, 16, 5), 336: (512, 3, 32, 5e-4, 16, 5),
        720: (512, 3, 32, 5e-4, 16, 5)}),
    "exchange": ("Exchange/S_Mamba.sh", 8, True, {
        96: (128, 2, 32, 1e-4, 16, 10), 192: (128, 2, 32, 1e-4, 32, 10), 336: (128, 2, 32, 5e-5, 32, 10),
        720: (128, 2, 32, 5e-5, 32, 10)}),
    "traffic": ("Traffic/S_Mamba.sh", 862, True, {
        96: (512, 4, 32, 1e-3, 16, 10), 192: (512, 4, 32, 1e-3, 16, 10), 336: (512, 4, 32, 2e-3, 16, 10),
        720: (512, 4, 32, 8e-4, 16, 10)}),
    "weather": ("Weather/S_Mamba.sh", 21, True, {
        96: (512, 3, 2, 5e-5, 32, 5), 192: (512, 3, 2, 5e-5, 32, 5), 336: (512, 3, 2, 5e-5, 32, 5),
        720: (512, 3, 2, 5e-5, 32, 5)}),
    "solar": ("SolarEnergy/S_Mamba.sh", 137, False, {
        96: (512, 2, 32, 1e-4, 32, 10), 192: (512, 2, 32, 1e-4, 32, 10), 336: (512, 2, 32, 1e-4, 32, 10),
        720: (512, 2, 32, 1e-4, 32, 10)}),
    "pems03": ("PEMS/S_Mamba_03.sh", 358, False, {
        12: (512, 4, 32, 1e-3, 32, 5), 24: (512, 4, 32, 1e-3, 32, 10), 48: (512, 5, 32, 1e-4, 32, 10),
        96: (512, 4, 32, 1.5e-3, 32, 10)}),
    "pems04": ("PEMS/S_Mamba_04.sh", 307, False, {
        12: (1024, 4, 32, 3e-4, 32, 10), 24: (1024, 4, 32, 3e-4, 32, 10), 48: (1024, 4, 32, 3e-4, 32, 10),
        96: (1024, 4, 32, 3e-4, 32, 10)}),
    "pems07": ("PEMS/S_Mamba_07.sh", 883, False, {
        12: (512, 2, 32, 7e-4, 16, 10), 24: (512, 2, 32, 7e-4, 32, 10), 48: (512, 4, 32, 5e-4, 16, 10),
        96: (512, 4, 32, 5e-4, 16, 10)}),
    "pems08": ("PEMS/S_Mamba_08.sh", 170, False, {
        12: (512, 2, 32, 1e-3, 32, 10), 24: (512, 2, 32, 7e-4, 32, 10), 48: (256, 4, 32, 1e-3, 16, 10),
        96: (256, 4, 32, 1e-3, 16, 10)}),
}


def _published_kwargs(dataset: str, horizon: int) -> dict:
    d_model, e_layers, d_state, *_ = _SCRIPTS[dataset][3][horizon]
    return dict(seq_len=96, pred_len=horizon, enc_in=_SCRIPTS[dataset][1], d_model=d_model, d_ff=d_model,
                e_layers=e_layers, d_state=d_state)


# The modules timm adapts when it loads weights into another in_chans / num_classes: the variate-token embedding
# (seq_len -> d_model, shared by every variate) and the head (the forecaster's: d_model -> pred_len).
_HEAD_CFG = dict(first_conv="encoder.embed", classifier="head")


def _cfg(dataset: str, horizon: int) -> dict:
    script, enc_in, marks, table = _SCRIPTS[dataset]
    _, _, _, lr, batch, epochs = table[horizon]
    return dict(
        input_size=(96, enc_in), license="unspecified (the official repository has no license file)",
        paper=_PAPER, source=f"{_SOURCE}/blob/main/scripts/multivariate_forecasting/{script}",
        notes=(
            f"published recipe: look-back 96, horizon {horizon}, Adam lr {lr:g} halved every epoch, batch {batch}, "
            f"{epochs} epochs, early stopping patience 3, MSE loss, dropout 0.1; "
            + ("4 timestamp features (hour, weekday, day of month, day of year) as extra tokens (x_mark); "
               if marks else "no timestamp tokens; ")
            + "no released weights"
        ),
        **_HEAD_CFG,
    )


# The free-hyper-parameter forecaster: no weights, the official run.py defaults.
register_pretrained_cfgs({
    "smamba": dict(license="unspecified (the official repository has no license file)",
                   paper=_PAPER, source=_SOURCE, notes="official run.py defaults; no released weights", **_HEAD_CFG),
})
register_pretrained_cfgs({f"smamba_{ds}.h{h}": _cfg(ds, h) for ds, spec in _SCRIPTS.items() for h in spec[3]})


def _tag(kwargs: dict) -> Optional[str]:
    """The horizon tag a caller asked for: create_model passes it as ``pretrained_cfg``."""
    cfg = kwargs.get("pretrained_cfg")
    if isinstance(cfg, str):
        return cfg
    if cfg is not None:
        return getattr(cfg, "tag", None) or (cfg.get("tag") if isinstance(cfg, dict) else None)
    return None


def _create_published(dataset: str, pretrained: bool, kwargs: dict) -> SMamba:
    horizons = list(_SCRIPTS[dataset][3])
    tag = _tag(kwargs) or f"h{horizons[0]}"
    try:
        horizon = int(tag.lstrip("h"))
        defaults = _published_kwargs(dataset, horizon)
    except (ValueError, KeyError):
        raise ValueError(
            f"smamba_{dataset}: unknown horizon tag {tag!r}; expected one of {['h%d' % h for h in horizons]}"
        ) from None
    kwargs.setdefault("pretrained_cfg", tag)
    return build_model(SMamba, f"smamba_{dataset}", pretrained, checkpoint_filter_fn=checkpoint_filter_fn,
                       **{**defaults, **kwargs})


@register_model
def smamba(pretrained: bool = False, **kwargs) -> SMamba:
    """S-Mamba forecaster with free hyper-parameters (official run.py defaults)."""
    return build_model(SMamba, "smamba", pretrained, checkpoint_filter_fn=checkpoint_filter_fn, **kwargs)


@register_model
def smamba_etth1(pretrained: bool = False, **kwargs) -> SMamba:
    """S-Mamba with the published ETTh1 hyper-parameters (tags h96 h192 h336 h720)."""
    return _create_published("etth1", pretrained, kwargs)


@register_model
def smamba_etth2(pretrained: bool = False, **kwargs) -> SMamba:
    """S-Mamba with the published ETTh2 hyper-parameters (tags h96 h192 h336 h720)."""
    return _create_published("etth2", pretrained, kwargs)


@register_model
def smamba_ettm1(pretrained: bool = False, **kwargs) -> SMamba:
    """S-Mamba with the published ETTm1 hyper-parameters (tags h96 h192 h336 h720)."""
    return _create_published("ettm1", pretrained, kwargs)


@register_model
def smamba_ettm2(pretrained: bool = False, **kwargs) -> SMamba:
    """S-Mamba with the published ETTm2 hyper-parameters (tags h96 h192 h336 h720)."""
    return _create_published("ettm2", pretrained, kwargs)


@register_model
def smamba_electricity(pretrained: bool = False, **kwargs) -> SMamba:
    """S-Mamba with the published Electricity (ECL, 321 variates) hyper-parameters (tags h96..h720)."""
    return _create_published("electricity", pretrained, kwargs)


@register_model
def smamba_exchange(pretrained: bool = False, **kwargs) -> SMamba:
    """S-Mamba with the published Exchange (8 variates) hyper-parameters (tags h96..h720)."""
    return _create_published("exchange", pretrained, kwargs)


@register_model
def smamba_traffic(pretrained: bool = False, **kwargs) -> SMamba:
    """S-Mamba with the published Traffic (862 variates) hyper-parameters (tags h96..h720)."""
    return _create_published("traffic", pretrained, kwargs)


@register_model
def smamba_weather(pretrained: bool = False, **kwargs) -> SMamba:
    """S-Mamba with the published Weather (21 variates) hyper-parameters (tags h96..h720)."""
    return _create_published("weather", pretrained, kwargs)


@register_model
def smamba_solar(pretrained: bool = False, **kwargs) -> SMamba:
    """S-Mamba with the published Solar-Energy (137 variates) hyper-parameters (tags h96..h720)."""
    return _create_published("solar", pretrained, kwargs)


@register_model
def smamba_pems03(pretrained: bool = False, **kwargs) -> SMamba:
    """S-Mamba with the published PEMS03 (358 variates) hyper-parameters (tags h12 h24 h48 h96)."""
    return _create_published("pems03", pretrained, kwargs)


@register_model
def smamba_pems04(pretrained: bool = False, **kwargs) -> SMamba:
    """S-Mamba with the published PEMS04 (307 variates) hyper-parameters (tags h12 h24 h48 h96)."""
    return _create_published("pems04", pretrained, kwargs)


@register_model
def smamba_pems07(pretrained: bool = False, **kwargs) -> SMamba:
    """S-Mamba with the published PEMS07 (883 variates) hyper-parameters (tags h12 h24 h48 h96)."""
    return _create_published("pems07", pretrained, kwargs)


@register_model
def smamba_pems08(pretrained: bool = False, **kwargs) -> SMamba:
    """S-Mamba with the published PEMS08 (170 variates) hyper-parameters (tags h12 h24 h48 h96)."""
    return _create_published("pems08", pretrained, kwargs)


# Trained here (configs/pretrained/smamba_classifier.basicmotions.yaml: `zoo tsc bench --seeds 0 --save-weights ...`);
# float16 package data. Its model_kwargs apply when the tag is named (or with pretrained=True); the bare
# `smamba_classifier` keeps taking free keyword arguments.
register_pretrained_cfgs({
    "smamba_classifier.basicmotions": dict(
        file="weights/smamba_classifier.basicmotions.safetensors",
        sha256="41d5b363fce46becfc54dab2420ce220b34c79a77429c0027e94931b23ca120a",
        num_classes=4, input_size=(100, 6), license="Apache-2.0 (weights trained by mamba-zoo)", paper=_PAPER,
        source="mamba-zoo", **_HEAD_CFG,
        model_kwargs=dict(seq_len=100, num_classes=4, d_model=64, d_state=16, d_ff=128, e_layers=2),
        notes="Trained on UEA BasicMotions (aeon's copy, official 40-series train split; 6 variates x 100 steps; "
              "classes Badminton, Running, Standing, Walking), variate tokens, 100 epochs.",
    ),
})


@register_model
def smamba_classifier(pretrained: bool = False, **kwargs) -> SMambaClassifier:
    """S-Mamba encoder over variate tokens with a mean-pooled classification head (zoo extension)."""
    return build_model(SMambaClassifier, "smamba_classifier", pretrained, **kwargs)
