"""MambAttention (Kühne, Tan et al., 2025) and a plain time-frequency Mamba baseline for speech enhancement.

"MambAttention: Mamba with Multi-Head Attention for Generalizable Single-Channel Speech Enhancement"
(arXiv:2507.00966; official code: github.com/NikolaiKyhne/MambAttention). The model works on the
short-time Fourier transform of the noisy waveform, in the MP-SENet / SEMamba layout:

    noisy wave -> RMS normalisation -> STFT (n_fft 400, hop 100, Hann 400 at 16 kHz)
      -> compressed magnitude |X|^0.3 and phase, stacked as 2 channels (b, 2, T, F)
      -> dense encoder: 1x1 conv, dilated DenseBlock (4 layers), (1, 3) conv with stride 2 over frequency
      -> N time-frequency blocks (below)
      -> magnitude decoder: DenseBlock, transposed conv back to F bins, a learnable sigmoid mask (beta 2)
         multiplying the noisy compressed magnitude
      -> phase decoder: DenseBlock, transposed conv, two 1x1 convs (real, imaginary) -> atan2
      -> decompressed magnitude and phase -> inverse STFT -> de-normalised wave

A MambAttention block (the paper's Fig. 1, its ``models/mambattention_block.py``) on features (b, T, F', c):

    along time   (sequences of T frames, one per frequency bin):  x = MHA(LN x) + x;  x = Linear(BiMamba(x)) + x
    along freq.  (sequences of F' bins, one per frame):           x = MHA(LN x) + x;  x = Linear(BiMamba(x)) + x

with ONE multi-head attention module (and its LayerNorm) shared by the time and the frequency pass: the
paper's point is that this sharing makes the model generalise to unseen noise. "BiMamba" is the official
layout: two independent Mamba blocks (RMSNorm -> Mamba, with a residual), one on the sequence and one on
the reversed sequence, concatenated (2c) and projected back to c (the official code's kernel-1
ConvTranspose1d, a Linear here). The plain baseline (``attention=False``, entries ``mamba_se*``) is the
same model without the attention: SEMamba's TF-Mamba block, the paper's "Mamba" comparison.

The Mamba mixers are the zoo's (``zoo.core.Mamba``: Triton on CUDA, the CPU scan elsewhere).

Deliberate differences from the official code: kernel-1 ConvTranspose1d written as Linear (same function);
the DenseBlock pads symmetrically in time ("same" output length); the transposed convs back to F bins are
MP-SENet's ConvTranspose2d (1, 3) stride (1, 2). Training loss (:func:`enhancement_loss`): the paper's
magnitude (0.9), phase (anti-wrapped instantaneous phase + group delay + instantaneous angular frequency, 0.3),
complex (0.1 x 2), time (0.2) and consistency (0.1 x 2) terms; the MetricGAN discriminator term (weight 0.05,
a PESQ-predicting discriminator) is not implemented.

Inputs of different lengths in one batch are not masked: enhance utterances one at a time (or crop to equal
lengths, as training does); padding changes the output.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from zoo.core import Mamba, RMSNorm
from zoo.core.checks import check_rates, check_sizes
from zoo.registry import build_model, register_model, register_pretrained_cfgs

_SOURCE = "https://github.com/NikolaiKyhne/MambAttention"
_PAPER = ("MambAttention: Mamba with Multi-Head Attention for Generalizable Single-Channel Speech Enhancement "
          "(Kühne, Tan et al., 2025, arXiv:2507.00966)")
_SEMAMBA = "https://github.com/RoyChao19477/SEMamba"
_SEMAMBA_PAPER = ("An Investigation of Incorporating Mamba for Speech Enhancement (Chao et al., 2024, "
                  "arXiv:2405.06573)")

# No classifier: an enhancement model maps waveforms to waveforms. The first conv is the encoder's input conv
# (over the 2 channels: compressed magnitude and phase).
_CFG = dict(num_classes=0, classifier=None, first_conv="encoder.conv_in", input_size=(16000,), license="MIT")

register_pretrained_cfgs({
    "mambattention": dict(
        paper=_PAPER, source=_SOURCE, **_CFG,
        notes="The paper's configuration (checkpoints/MambAttention_seed3441_VB-DemandEx.yaml of the official "
              "code): 64 channels, 4 blocks, Mamba d_state 16, d_conv 4, expand 4, 8 attention heads. The official "
              "weights are not released.",
    ),
    "mambattention_tiny": dict(
        paper=_PAPER, source="mamba-zoo", **{**_CFG, "license": "Apache-2.0"},
        notes="Our small configuration of the paper's architecture (16 channels, 2 blocks, 3-layer DenseBlocks, expand 2, "
              "4 heads, STFT n_fft 256 / hop 128).",
    ),
    "mamba_se": dict(
        paper=_SEMAMBA_PAPER, source=_SEMAMBA, **_CFG,
        notes="The plain time-frequency Mamba baseline (SEMamba's TF-Mamba block, the MambAttention paper's 'Mamba' "
              "comparison): mambattention without the shared attention.",
    ),
    "mamba_se_tiny": dict(
        paper=_SEMAMBA_PAPER, source="mamba-zoo", **{**_CFG, "license": "Apache-2.0"},
        notes="mambattention_tiny without the shared attention: the baseline of the same encoder, decoders and width.",
    ),
})


# --------------------------------------------------------------------------------------------- spectra

def anti_wrap(x: torch.Tensor) -> torch.Tensor:
    """|x - 2 pi round(x / 2 pi)|: a phase difference folded into [0, pi]."""
    return torch.abs(x - torch.round(x / (2 * math.pi)) * 2 * math.pi)


class LearnableSigmoid(nn.Module):
    """beta * sigmoid(slope_f * x) with one learned slope per frequency bin (MP-SENet's mask activation)."""

    def __init__(self, num_freqs: int, beta: float = 2.0):
        super().__init__()
        self.beta = beta
        self.slope = nn.Parameter(torch.ones(num_freqs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., F)
        return self.beta * torch.sigmoid(self.slope * x)


class DenseBlock(nn.Module):
    """Densely connected dilated convs over (time, freq): layer i sees all earlier outputs, dilation 2^i in time."""

    def __init__(self, channels: int, depth: int = 4, kernel_size: Tuple[int, int] = (3, 3)):
        super().__init__()
        kt, kf = kernel_size
        self.layers = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(channels * (i + 1), channels, kernel_size, dilation=(2 ** i, 1),
                          padding=(2 ** i * (kt - 1) // 2, (kf - 1) // 2)),
                nn.InstanceNorm2d(channels, affine=True),
                nn.PReLU(channels),
            )
            for i in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x
        for layer in self.layers:
            x = layer(skip)
            skip = torch.cat([x, skip], dim=1)
        return x


class DenseEncoder(nn.Module):
    """(b, 2, T, F) -> (b, c, T, F') with F' = (F - 3) // 2 + 1."""

    def __init__(self, in_chans: int, channels: int, depth: int = 4):
        super().__init__()
        self.conv_in = nn.Conv2d(in_chans, channels, 1)
        self.norm_in = nn.InstanceNorm2d(channels, affine=True)
        self.act_in = nn.PReLU(channels)
        self.dense = DenseBlock(channels, depth)
        self.conv_out = nn.Conv2d(channels, channels, (1, 3), stride=(1, 2))
        self.norm_out = nn.InstanceNorm2d(channels, affine=True)
        self.act_out = nn.PReLU(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act_in(self.norm_in(self.conv_in(x)))
        x = self.dense(x)
        return self.act_out(self.norm_out(self.conv_out(x)))


def _upsample_freq(channels: int, num_freqs: int) -> nn.ConvTranspose2d:
    """The transposed conv that undoes the encoder's stride-2 frequency conv, back to exactly ``num_freqs`` bins."""
    reduced = (num_freqs - 3) // 2 + 1
    return nn.ConvTranspose2d(channels, channels, (1, 3), stride=(1, 2), output_padding=(0, num_freqs - (2 * reduced + 1)))


class MagnitudeDecoder(nn.Module):
    """(b, c, T, F') -> a mask (b, T, F) in (0, beta) for the noisy compressed magnitude."""

    def __init__(self, channels: int, num_freqs: int, depth: int = 4, beta: float = 2.0):
        super().__init__()
        self.dense = DenseBlock(channels, depth)
        self.up = _upsample_freq(channels, num_freqs)
        self.conv = nn.Conv2d(channels, 1, 1)
        self.norm = nn.InstanceNorm2d(1, affine=True)
        self.act = nn.PReLU(1)
        self.conv_out = nn.Conv2d(1, 1, 1)
        self.mask = LearnableSigmoid(num_freqs, beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.up(self.dense(x))
        x = self.conv_out(self.act(self.norm(self.conv(x))))
        return self.mask(x[:, 0])


class PhaseDecoder(nn.Module):
    """(b, c, T, F') -> phase (b, T, F) as atan2 of two parallel 1x1 convs (pseudo imaginary and real parts)."""

    def __init__(self, channels: int, num_freqs: int, depth: int = 4):
        super().__init__()
        self.dense = DenseBlock(channels, depth)
        self.up = _upsample_freq(channels, num_freqs)
        self.norm = nn.InstanceNorm2d(channels, affine=True)
        self.act = nn.PReLU(channels)
        self.conv_real = nn.Conv2d(channels, 1, 1)
        self.conv_imag = nn.Conv2d(channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm(self.up(self.dense(x))))
        return torch.atan2(self.conv_imag(x), self.conv_real(x))[:, 0]


# --------------------------------------------------------------------------------------------- blocks

class BiMambaLayer(nn.Module):
    """The official ``MambaBlock``: forward and backward Mamba blocks (RMSNorm -> Mamba, plus the input) with their
    own weights, the backward one on the reversed sequence; outputs concatenated (b, L, 2c)."""

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: float = 4, norm_eps: float = 1e-5):
        super().__init__()
        self.norm_fwd = RMSNorm(dim, eps=norm_eps)
        self.mamba_fwd = Mamba(dim, d_state=d_state, d_conv=d_conv, expand=expand)
        self.norm_bwd = RMSNorm(dim, eps=norm_eps)
        self.mamba_bwd = Mamba(dim, d_state=d_state, d_conv=d_conv, expand=expand)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fwd = x + self.mamba_fwd(self.norm_fwd(x))
        rev = x.flip(1)
        bwd = (rev + self.mamba_bwd(self.norm_bwd(rev))).flip(1)
        return torch.cat([fwd, bwd], dim=-1)


class SharedAttention(nn.Module):
    """LayerNorm -> multi-head self-attention (no residual: the block adds it). The projections are
    nn.MultiheadAttention's (``in_proj`` for q, k, v; ``out_proj``). On CUDA through
    F.scaled_dot_product_attention; elsewhere as explicit matrix products (PyTorch's CPU flash kernel is
    two orders of magnitude slower at these head sizes: 4-8 channels, thousands of short sequences)."""

    def __init__(self, dim: int, num_heads: int = 8, dropout: float = 0.0):
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.norm = nn.LayerNorm(dim)
        self.in_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.in_proj(self.norm(x)).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        if x.is_cuda:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        else:
            attn = torch.softmax((q * (q.shape[-1] ** -0.5)) @ k.transpose(-1, -2), dim=-1)
            y = F.dropout(attn, p) @ v
        return self.out_proj(y.transpose(1, 2).reshape(b, n, c))


class TFMambaBlock(nn.Module):
    """Time then frequency: [shared MHA +] BiMamba + projection, residual each. Features (b, T, F, c)."""

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: float = 4, num_heads: int = 8,
                 attention: bool = True, attn_drop: float = 0.0, norm_eps: float = 1e-5):
        super().__init__()
        self.attention = SharedAttention(dim, num_heads, attn_drop) if attention else None
        self.time_mamba = BiMambaLayer(dim, d_state, d_conv, expand, norm_eps)
        self.time_proj = nn.Linear(2 * dim, dim)
        self.freq_mamba = BiMambaLayer(dim, d_state, d_conv, expand, norm_eps)
        self.freq_proj = nn.Linear(2 * dim, dim)

    def _axis(self, x: torch.Tensor, mamba: nn.Module, proj: nn.Module) -> torch.Tensor:
        if self.attention is not None:
            x = self.attention(x) + x
        return proj(mamba(x)) + x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, f, c = x.shape
        x = x.transpose(1, 2).reshape(b * f, t, c)  # one sequence of frames per frequency bin
        x = self._axis(x, self.time_mamba, self.time_proj)
        x = x.reshape(b, f, t, c).transpose(1, 2).reshape(b * t, f, c)  # one sequence of bins per frame
        x = self._axis(x, self.freq_mamba, self.freq_proj)
        return x.reshape(b, t, f, c)


# --------------------------------------------------------------------------------------------- model

class MambAttention(nn.Module):
    """Speech enhancement on the compressed magnitude and phase spectra (see the module docstring).

    Args:
        hid_feature: channels of the encoder, blocks and decoders (the paper: 64).
        num_blocks: time-frequency blocks (the paper: 4).
        attention: the shared time/frequency multi-head attention of MambAttention; False gives the plain
            TF-Mamba baseline (SEMamba's block).
        num_heads: attention heads (the paper: 8).
        d_state, d_conv, expand: the Mamba mixers' (the paper: 16, 4, 4).
        n_fft, hop_length, win_length: the STFT at ``sample_rate`` (the paper: 400, 100, 400 at 16 kHz).
        compress_factor: magnitude compression exponent (0.3); beta: the mask's upper bound (2.0).
        dense_depth: layers of each DenseBlock (4).
        normalize_input: scale each waveform to unit RMS before the STFT and back after (as the official
            training and inference do), so any input level works.
    """

    def __init__(
        self,
        hid_feature: int = 64,
        num_blocks: int = 4,
        attention: bool = True,
        num_heads: int = 8,
        d_state: int = 16,
        d_conv: int = 4,
        expand: float = 4,
        n_fft: int = 400,
        hop_length: int = 100,
        win_length: int = 400,
        sample_rate: int = 16000,
        compress_factor: float = 0.3,
        beta: float = 2.0,
        dense_depth: int = 4,
        attn_drop: float = 0.0,
        normalize_input: bool = True,
        num_classes: int = 0,
        in_chans: int = 2,
    ):
        super().__init__()
        check_sizes("MambAttention", hid_feature=hid_feature, num_blocks=num_blocks, num_heads=num_heads, d_state=d_state,
                    d_conv=d_conv, n_fft=n_fft, hop_length=hop_length, win_length=win_length, sample_rate=sample_rate,
                    dense_depth=dense_depth)
        check_rates("MambAttention", attn_drop=attn_drop)
        if num_classes:
            raise ValueError(f"MambAttention: an enhancement model has no classifier; num_classes must be 0, got {num_classes}")
        if in_chans != 2:
            raise ValueError(f"MambAttention: the encoder reads 2 channels (compressed magnitude, phase), got in_chans={in_chans}")
        if attention and hid_feature % num_heads:
            raise ValueError(f"MambAttention: hid_feature ({hid_feature}) must be a multiple of num_heads ({num_heads})")
        if win_length > n_fft:
            raise ValueError(f"MambAttention: win_length ({win_length}) must be <= n_fft ({n_fft})")
        if not 0 < compress_factor <= 1:
            raise ValueError(f"MambAttention: compress_factor must be in (0, 1], got {compress_factor}")
        self.n_fft, self.hop_length, self.win_length, self.sample_rate = n_fft, hop_length, win_length, sample_rate
        self.compress_factor, self.normalize_input, self.attention = compress_factor, normalize_input, attention
        self.num_freqs = n_fft // 2 + 1
        if self.num_freqs < 3:
            raise ValueError(f"MambAttention: n_fft must be >= 4 (3 frequency bins), got {n_fft}")
        self.num_classes = 0
        self.num_features = self.head_hidden_size = self.embed_dim = hid_feature
        self.register_buffer("window", torch.hann_window(win_length), persistent=False)
        self.encoder = DenseEncoder(in_chans, hid_feature, dense_depth)
        self.blocks = nn.ModuleList(
            TFMambaBlock(hid_feature, d_state, d_conv, expand, num_heads, attention, attn_drop) for _ in range(num_blocks)
        )
        self.mag_decoder = MagnitudeDecoder(hid_feature, self.num_freqs, dense_depth, beta)
        self.phase_decoder = PhaseDecoder(hid_feature, self.num_freqs, dense_depth)
        self.grad_checkpointing = False

    # --- timm-style interface ---
    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self):
        return {n for n, _ in self.named_parameters() if n.endswith(("A_log", ".D"))}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r"^encoder", blocks=r"^blocks\.(\d+)")

    def get_classifier(self):
        return None

    def reset_classifier(self, num_classes: int = 0, *args):
        if num_classes:
            raise ValueError(f"MambAttention has no classifier to reset; num_classes must be 0, got {num_classes}")

    # --- spectra ---
    def stft(self, wave: torch.Tensor):
        """(b, n) -> compressed magnitude (b, T, F), phase (b, T, F), compressed complex (b, T, F, 2)."""
        spec = torch.stft(wave, self.n_fft, self.hop_length, self.win_length, window=self.window.to(wave.dtype),
                          center=True, pad_mode="reflect", normalized=False, return_complex=True)
        spec = torch.view_as_real(spec).transpose(1, 2)  # (b, T, F, 2)
        mag = torch.sqrt(spec.pow(2).sum(-1) + 1e-9)
        pha = torch.atan2(spec[..., 1] + 1e-10, spec[..., 0] + 1e-5)
        mag_c = mag.pow(self.compress_factor)
        return mag_c, pha, torch.stack([mag_c * torch.cos(pha), mag_c * torch.sin(pha)], dim=-1)

    def istft(self, mag_c: torch.Tensor, pha: torch.Tensor, length: Optional[int] = None) -> torch.Tensor:
        """Compressed magnitude and phase (b, T, F) -> waveform (b, length)."""
        mag = mag_c.clamp(min=0).pow(1.0 / self.compress_factor)
        spec = torch.complex(mag * torch.cos(pha), mag * torch.sin(pha)).transpose(1, 2)
        return torch.istft(spec, self.n_fft, self.hop_length, self.win_length, window=self.window.to(mag.dtype),
                           center=True, length=length)

    # --- network ---
    def forward_features(self, mag_c: torch.Tensor, pha: torch.Tensor) -> torch.Tensor:
        """Compressed magnitude and phase (b, T, F) -> block features (b, T, F', hid_feature)."""
        if mag_c.dim() != 3 or mag_c.shape != pha.shape or mag_c.shape[-1] != self.num_freqs:
            raise ValueError(f"MambAttention: expected magnitude and phase (batch, frames, {self.num_freqs}), got "
                             f"{tuple(mag_c.shape)} and {tuple(pha.shape)}")
        x = self.encoder(torch.stack([mag_c, pha], dim=1)).permute(0, 2, 3, 1)  # (b, T, F', c)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def forward_head(self, x: torch.Tensor, mag_c: Optional[torch.Tensor] = None, pre_logits: bool = False):
        """Block features (b, T, F', c) -> enhanced compressed magnitude and phase (b, T, F) (``mag_c``: the noisy
        compressed magnitude the mask multiplies). ``pre_logits``: the features themselves."""
        if pre_logits:
            return x
        x = x.permute(0, 3, 1, 2)
        mask = self.mag_decoder(x)
        return mask * mag_c, self.phase_decoder(x)

    def forward_spec(self, mag_c: torch.Tensor, pha: torch.Tensor):
        """Noisy compressed magnitude and phase (b, T, F) -> enhanced (magnitude, phase, complex (b, T, F, 2))."""
        mag, pha = self.forward_head(self.forward_features(mag_c, pha), mag_c)
        return mag, pha, torch.stack([mag * torch.cos(pha), mag * torch.sin(pha)], dim=-1)

    def input_scale(self, wave: torch.Tensor) -> torch.Tensor:
        """(b, n) -> (b, 1): the factor that gives each waveform unit RMS (1 when normalize_input is off)."""
        if not self.normalize_input:
            return wave.new_ones(wave.shape[0], 1)
        return torch.rsqrt(wave.pow(2).mean(-1, keepdim=True).clamp(min=1e-10))

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """Noisy waveforms (b, samples) at ``sample_rate`` -> enhanced waveforms of the same shape."""
        if wave.dim() != 2:
            raise ValueError(f"MambAttention: expected waveforms (batch, samples), got shape {tuple(wave.shape)}")
        if wave.shape[1] <= self.n_fft // 2:
            raise ValueError(f"MambAttention: waveforms need more than n_fft/2 = {self.n_fft // 2} samples, got {wave.shape[1]}")
        scale = self.input_scale(wave)
        mag_c, pha, _ = self.stft(wave * scale)
        mag_c, pha, _ = self.forward_spec(mag_c, pha)
        return self.istft(mag_c, pha, wave.shape[1]) / scale


def enhancement_loss(model: MambAttention, noisy: torch.Tensor, clean: torch.Tensor, autocast=None) -> Tuple[torch.Tensor, dict]:
    """The paper's generator loss without the metric-discriminator term, on waveforms (b, n) scaled by the noisy
    input's RMS factor (as the official training does). ``autocast``: a context manager for the network part
    (the STFTs and the loss stay in float32). Returns (total, {term: value})."""
    import contextlib

    scale = model.input_scale(noisy)
    noisy, clean = noisy * scale, clean * scale
    mag_n, pha_n, _ = model.stft(noisy)
    mag_c, pha_c, com_c = model.stft(clean)
    with autocast or contextlib.nullcontext():
        mag_g, pha_g, _ = model.forward_spec(mag_n, pha_n)
    mag_g, pha_g = mag_g.float(), pha_g.float()
    com_g = torch.stack([mag_g * torch.cos(pha_g), mag_g * torch.sin(pha_g)], dim=-1)
    wave_g = model.istft(mag_g, pha_g, noisy.shape[1])
    _, _, com_gg = model.stft(wave_g)  # consistency: the enhanced spectrum after a round trip through the wave
    frames = min(com_g.shape[1], com_gg.shape[1])
    terms = dict(
        magnitude=F.mse_loss(mag_g, mag_c),
        phase=(anti_wrap(pha_g - pha_c).mean()
               + anti_wrap(torch.diff(pha_g, dim=2) - torch.diff(pha_c, dim=2)).mean()    # group delay (frequency)
               + anti_wrap(torch.diff(pha_g, dim=1) - torch.diff(pha_c, dim=1)).mean()),  # inst. frequency (time)
        complex=2 * F.mse_loss(com_g, com_c),
        time=F.l1_loss(wave_g, clean),
        consistency=2 * F.mse_loss(com_g[:, :frames], com_gg[:, :frames]),
    )
    weights = dict(magnitude=0.9, phase=0.3, complex=0.1, time=0.2, consistency=0.1)
    total = sum(weights[k] * v for k, v in terms.items())
    return total, {k: float(v.detach()) for k, v in terms.items()}


# --------------------------------------------------------------------------------------------- entries

def _paper(**kwargs):
    return dict(hid_feature=64, num_blocks=4, num_heads=8, d_state=16, d_conv=4, expand=4, n_fft=400, hop_length=100,
                win_length=400, compress_factor=0.3, beta=2.0, **kwargs)


def _tiny(**kwargs):
    # Half the paper's time-frequency grid (n_fft 256, hop 128: 126 frames x 129 bins a second instead of 161 x 201).
    return dict(hid_feature=16, num_blocks=2, num_heads=4, d_state=16, d_conv=4, expand=2, n_fft=256, hop_length=128,
                win_length=256, compress_factor=0.3, beta=2.0, dense_depth=3, **kwargs)


@register_model
def mambattention(pretrained: bool = False, **kwargs):
    """MambAttention as published (official config MambAttention_seed3441_VB-DemandEx.yaml)."""
    return build_model(MambAttention, "mambattention", pretrained, **{**_paper(attention=True), **kwargs})


@register_model
def mambattention_tiny(pretrained: bool = False, **kwargs):
    """MambAttention at 16 channels, 2 blocks: a size that trains on a CPU."""
    return build_model(MambAttention, "mambattention_tiny", pretrained, **{**_tiny(attention=True), **kwargs})


@register_model
def mamba_se(pretrained: bool = False, **kwargs):
    """The plain TF-Mamba baseline of the paper's size: mambattention without the shared attention."""
    return build_model(MambAttention, "mamba_se", pretrained, **{**_paper(attention=False), **kwargs})


@register_model
def mamba_se_tiny(pretrained: bool = False, **kwargs):
    """mambattention_tiny without the shared attention."""
    return build_model(MambAttention, "mamba_se_tiny", pretrained, **{**_tiny(attention=False), **kwargs})
