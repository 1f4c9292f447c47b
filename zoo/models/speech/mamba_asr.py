"""Mamba speech encoders: ConMamba (Jiang et al., 2024) and a plain bidirectional Mamba stack.

Front end: 80-bin Kaldi fbank (25 ms / 10 ms) or log-mel through torchaudio, SpecAugment masks,
a convolutional 4x subsampling. Encoder: ConMamba layers (the Conformer layout with a
bidirectional Mamba in place of self-attention, as in xi-j/Mamba-ASR) or pre-norm residual
Mamba blocks (bidirectional, or unidirectional and causal for streaming). Heads: CTC over a
token vocabulary, or masked-mean-pooled sequence classification.

Features are normalised per utterance (offline models) or with fixed global CMVN statistics (causal
models, which cannot wait for an utterance mean). Streaming: ``model.stream()`` returns a
``StreamingTranscriber`` that takes waveform chunks of any length and carries the state (leftover
samples, the subsampling's pending frames, each Mamba's conv and SSM state) from chunk to chunk;
its output equals the full pass (tested).

Batches of different lengths: every operation either works per frame, masks padded frames to
zero before it mixes frames (convolutions), or runs the Mamba over the valid frames only, packed
with ``cu_seqlens``. So padding never changes the output on the unpadded part (tested).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from zoo.core import BiMamba, Mamba, ResidualBlock, RMSNorm, add_norm
from zoo.core.checks import check_num_classes, check_rates, check_sizes
from zoo.core.precision import upcast
from zoo.registry import build_model, register_model, register_pretrained_cfgs

_MAMBA_ASR = "https://github.com/xi-j/Mamba-ASR"
_PAPER = "Speech Slytherin: Examining the Performance and Efficiency of Mamba for Speech Separation, Recognition, and Synthesis (Jiang et al., 2024, arXiv:2407.09732)"

# The modules timm adapts when it loads weights into another in_chans / num_classes: the first subsampling conv
# (over the (frames, mels) plane) and the head.
_HEAD_CFG = dict(first_conv="subsample.conv1", classifier="head")

register_pretrained_cfgs({
    "conmamba_ctc_large": dict(
        num_classes=31, license="Apache-2.0", paper=_PAPER, source=_MAMBA_ASR, **_HEAD_CFG,
        metrics={"librispeech_test_clean_wer": 3.9, "librispeech_test_other_wer": 10.3},
        notes="Published: ConMamba (CTC) encoder only, character CTC, no LM, 31.6M params (README performance "
              "table of xi-j/Mamba-ASR). No official checkpoint is released ('Inference and Checkpoints (Later)').",
    ),
    # Trained here (configs/pretrained/mamba_kws_tiny.kws.yaml: `zoo speech --task kws --epochs 4`); float16
    # package data. The tag is the arch's default, so `create_model("mamba_kws_tiny", pretrained=True)` loads it.
    "mamba_kws_tiny.kws": dict(
        file="weights/mamba_kws_tiny.kws.safetensors",
        sha256="e7f4a68e9c045abba0531c0274fe7ef16f6a1a570352248c3f06dab4aa21dda3",
        num_classes=22, input_size=(16000,), license="Apache-2.0", source="mamba-zoo", **_HEAD_CFG,
        notes="Keyword spotting on the espeak-ng corpus built by zoo.data.speech (12 command words + 10 digits); "
              "input: 16 kHz waveforms (batch, samples) with their lengths.",
    ),
    "mamba_ctc_tiny": dict(
        num_classes=11, license="Apache-2.0", source="mamba-zoo", **_HEAD_CFG,
        notes="Bidirectional (offline) encoder: CTC over the digits of synthesized digit strings (blank + 10).",
    ),
    # Trained here on CPU (configs/pretrained/mamba_ctc_tiny.sentences.yaml: `zoo speech --task sentences --n-strings
    # 3000 --epochs 15 --batch-size 16 --lr 2e-3`); float16 package data. Not the arch's default tag (that one stays
    # the 11-class digits head): ask for it by name. model_kwargs: the entrypoint sets the digits head's 11 classes.
    "mamba_ctc_tiny.sentences": dict(
        file="weights/mamba_ctc_tiny.sentences.safetensors", model_kwargs=dict(num_classes=29),
        sha256="70fe1f36a1e1972622764628f7f21ee140eb309894cd3b2e20ceb7e92f041962",
        num_classes=29, input_size=(16000,), license="Apache-2.0", source="mamba-zoo", **_HEAD_CFG,
        notes="Bidirectional (offline) encoder: CTC over the characters of synthesized words and short sentences "
              "(blank 0; token k is zoo.data.speech.CHARS[k - 1]: space, apostrophe, a-z); input: 16 kHz waveforms "
              "(batch, samples) with their lengths; greedy CTC decoding, no language model.",
    ),
    # Trained here on CPU (configs/pretrained/mamba_ctc_causal_tiny.digits.yaml: `zoo speech --task digits --n-strings
    # 3000 --epochs 16`); float16 package data; the arch's default tag.
    "mamba_ctc_causal_tiny.digits": dict(
        file="weights/mamba_ctc_causal_tiny.digits.safetensors",
        sha256="71a791e66661f9dd39d298b1a96d59ab58b618a5d395913b1aa31f9cf74a305f",
        num_classes=11, input_size=(16000,), license="Apache-2.0", source="mamba-zoo", **_HEAD_CFG,
        notes="Causal, streamable encoder: CTC over the digits of synthesized digit strings (blank + 10; token k is "
              "the digit k - 1); input: 16 kHz waveforms (batch, samples) with their lengths; model.stream() decodes "
              "chunk by chunk.",
    ),
})


def lengths_to_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(b,) -> (b, max_len) bool, True on valid frames."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


class SpeechFrontend(nn.Module):
    """Waveform (b, samples) at ``sample_rate`` -> features (b, frames, n_mels) and frame counts.

    ``kind="fbank"``: Kaldi-compatible log mel filterbank (torchaudio.compliance.kaldi.fbank,
    per utterance). ``kind="logmel"``: torchaudio MelSpectrogram, batched.

    ``normalize``: ``"utterance"`` removes each utterance's mean and variance over its valid frames
    (needs the whole utterance). ``"global"`` (streaming models) removes a fixed per-bin mean and
    divides by a fixed per-bin standard deviation (global CMVN, as WeNet / ESPnet streaming
    recipes), kept as buffers ``global_mean`` / ``global_std`` in the state dict: estimate them with
    ``fit_global_stats`` on training audio; if still unset when the module first runs in training
    mode, the first batch sets them (a data-dependent initialisation, as ActNorm's). ``"none"``:
    raw log energies (mean about 18, std about 3 for speech at int16 scale, which the 4x
    subsampling's first conv + LayerNorm over 16 channels turns into an almost constant vector:
    a causal CTC encoder on such features did not learn, issue 22).
    """

    def __init__(self, n_mels: int = 80, sample_rate: int = 16000, kind: str = "fbank", normalize: str = "utterance"):
        super().__init__()
        if kind not in ("fbank", "logmel"):
            raise ValueError(f"SpeechFrontend: kind must be 'fbank' or 'logmel', got {kind!r}")
        if normalize not in ("utterance", "global", "none"):
            raise ValueError(f"SpeechFrontend: normalize must be 'utterance', 'global' or 'none', got {normalize!r}")
        self.n_mels, self.sample_rate, self.kind, self.normalize = n_mels, sample_rate, kind, normalize
        self.win, self.hop = sample_rate * 25 // 1000, sample_rate * 10 // 1000
        if normalize == "global":
            self.register_buffer("global_mean", torch.zeros(n_mels))
            self.register_buffer("global_std", torch.ones(n_mels))
            # How many frames the statistics come from (0: not estimated yet).
            self.register_buffer("global_frames", torch.zeros((), dtype=torch.long))
        if kind == "logmel":
            import torchaudio

            self.mel = torchaudio.transforms.MelSpectrogram(
                sample_rate, n_fft=self.win, win_length=self.win, hop_length=self.hop, n_mels=n_mels, center=False
            )

    def num_frames(self, num_samples: torch.Tensor) -> torch.Tensor:
        return torch.clamp((num_samples - self.win) // self.hop + 1, min=0)

    @torch.no_grad()
    def fit_global_stats(self, batches) -> "SpeechFrontend":
        """Global CMVN statistics from an iterable of (waves (b, samples), num_samples (b,) or None): per-bin mean and
        standard deviation over every valid frame, accumulated in float64. Returns self."""
        if self.normalize != "global":
            raise RuntimeError(f"fit_global_stats: needs normalize='global', this front end has {self.normalize!r}")
        total = torch.zeros((), dtype=torch.float64)
        s1 = torch.zeros(self.n_mels, dtype=torch.float64)
        s2 = torch.zeros(self.n_mels, dtype=torch.float64)
        for wave, num_samples in batches:
            feats, frames = self.raw_features(wave, num_samples)
            valid = feats[lengths_to_mask(frames, feats.shape[1])].double()
            total += valid.shape[0]
            s1 += valid.sum(0)
            s2 += (valid**2).sum(0)
        if total == 0:
            raise ValueError("fit_global_stats: no frames in the batches given")
        mean = s1 / total
        self.global_mean.copy_(mean)
        self.global_std.copy_((s2 / total - mean**2).clamp(min=1e-10).sqrt())
        self.global_frames.fill_(int(total))
        return self

    def forward(self, wave: torch.Tensor, num_samples: Optional[torch.Tensor] = None):
        feats, frames = self.raw_features(wave, num_samples)
        mask = lengths_to_mask(frames, feats.shape[1])[..., None]
        if self.normalize == "utterance":
            count = frames[:, None, None].clamp(min=1)
            mean = feats.sum(1, keepdim=True) / count
            var = ((feats - mean) ** 2 * mask).sum(1, keepdim=True) / count
            feats = (feats - mean) / torch.sqrt(var + 1e-5) * mask
        elif self.normalize == "global":
            if self.training and int(self.global_frames) == 0:
                self.fit_global_stats([(wave, num_samples)])
            feats = (feats - self.global_mean.to(feats.dtype)) / self.global_std.to(feats.dtype) * mask
        return feats, frames

    def raw_features(self, wave: torch.Tensor, num_samples: Optional[torch.Tensor] = None):
        """Waveforms -> log mel features before any normalisation (padded frames zero) and frame counts."""
        if wave.dim() != 2:
            raise ValueError(f"SpeechFrontend: expected waveforms (batch, samples), got shape {tuple(wave.shape)}")
        b, n = wave.shape
        if num_samples is None:
            # Whole waveforms: the frame count comes from the shape, so no value is read (one torch.compile graph).
            T, lengths = max((n - self.win) // self.hop + 1, 0), [n] * b
            frames = torch.full((b,), T, dtype=torch.long, device=wave.device)
        else:
            frames = self.num_frames(num_samples)
            T, lengths = int(frames.max()) if b else 0, num_samples.tolist()
        if b and (T < 1 if num_samples is None else int(frames.min()) < 1):
            raise ValueError(f"SpeechFrontend: every waveform needs at least {self.win} samples (25 ms), got lengths {lengths}")
        if self.kind == "fbank":
            import torchaudio.compliance.kaldi as kaldi

            feats = wave.new_zeros(b, T, self.n_mels)
            for i, (w, length) in enumerate(zip(wave, lengths)):
                f = kaldi.fbank(upcast(w[None, :length]) * 32768, num_mel_bins=self.n_mels, sample_frequency=self.sample_rate, dither=0.0)
                feats[i, : f.shape[0]] = f
        else:
            feats = torch.log(self.mel(upcast(wave)).transpose(1, 2)[:, :T] + 1e-6)
        return feats * lengths_to_mask(frames, T)[..., None], frames


class SpecAugment(nn.Module):
    """SpecAugment (Park et al., 2019) frequency and time masks, drawn per utterance, training only."""

    def __init__(self, freq_masks: int = 2, freq_width: int = 15, time_masks: int = 2, time_width: int = 10):
        super().__init__()
        self.freq_masks, self.freq_width, self.time_masks, self.time_width = freq_masks, freq_width, time_masks, time_width

    def forward(self, feats: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return feats
        b, T, F_ = feats.shape
        keep = torch.ones_like(feats, dtype=torch.bool)
        for i in range(b):
            for _ in range(self.freq_masks):
                w = int(torch.randint(0, self.freq_width + 1, ()))
                f0 = int(torch.randint(0, max(1, F_ - w), ()))
                keep[i, :, f0 : f0 + w] = False
            for _ in range(self.time_masks):
                w = min(int(torch.randint(0, self.time_width + 1, ())), int(frames[i]) // 5)
                t0 = int(torch.randint(0, max(1, int(frames[i]) - w), ()))
                keep[i, t0 : t0 + w] = False
        return feats * keep


class ConvSubsampling(nn.Module):
    """Two 3x3 stride-2 convolutions over (time, frequency): 4x fewer frames, then a linear layer.

    Padded frames are zeroed before each convolution, so what a valid output frame reads past the
    end of its utterance is zero, exactly as the convolution's own padding of an unpadded input.
    ``causal=True`` pads time on the left only (output t reads input frames up to 4t + 3), which
    allows chunk-by-chunk streaming with a few carried frames.
    """

    def __init__(self, n_mels: int, d_model: int, channels: Sequence[int] = (64, 32), causal: bool = False):
        super().__init__()
        self.causal = causal
        c1, c2 = channels
        self.conv1 = nn.Conv2d(1, c1, 3, stride=2, padding=(0, 1))
        self.norm1 = nn.LayerNorm(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, stride=2, padding=(0, 1))
        self.norm2 = nn.LayerNorm(c2)
        self.out = nn.Linear(c2 * (((n_mels + 1) // 2 + 1) // 2), d_model)

    @staticmethod
    def out_frames(frames: torch.Tensor) -> torch.Tensor:
        return (((frames + 1) // 2) + 1) // 2

    def _stage(self, x, conv, norm, frames):
        # x: (b, c, T, F). Time padding: 1 on each side, or 2 on the left when causal.
        x = x * lengths_to_mask(frames, x.shape[2])[:, None, :, None]
        x = F.pad(x, (0, 0, 2, 0) if self.causal else (0, 0, 1, 1))
        x = conv(x)
        x = F.leaky_relu(norm(x.transpose(1, -1)).transpose(1, -1))
        return x, (frames + 1) // 2

    def forward(self, feats: torch.Tensor, frames: torch.Tensor):
        x, f = self._stage(feats[:, None], self.conv1, self.norm1, frames)
        x, f = self._stage(x, self.conv2, self.norm2, f)
        x = self.out(x.permute(0, 2, 1, 3).flatten(2))
        return x * lengths_to_mask(f, x.shape[1])[..., None], f


def packed_mamba(mixer: nn.Module, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Run a Mamba mixer over the valid frames of each utterance only, packed into one sequence (mask None: every
    frame is valid, the batch runs as it is)."""
    if mask is None:
        return mixer(x)
    lengths = mask.sum(1)
    cu = F.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32)
    out = torch.zeros_like(x)
    out[mask] = mixer(x[mask][None], cu_seqlens=cu)[0].to(x.dtype)
    return out


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ffn: int, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, d_ffn)
        self.fc2 = nn.Linear(d_ffn, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(self.norm(x))))))


class ConvModule(nn.Module):
    """Conformer convolution module: LN -> pointwise conv + GLU -> depthwise conv -> LN -> GELU -> linear.

    As in Mamba-ASR's ConMamba (LayerNorm after the depthwise conv, not BatchNorm, which would also
    make the output depend on the other utterances of the batch)."""

    def __init__(self, d_model: int, kernel_size: int = 31, dropout: float = 0.0):
        super().__init__()
        self.layer_norm = nn.LayerNorm(d_model)
        self.pointwise = nn.Conv1d(d_model, 2 * d_model, 1)
        self.depthwise = nn.Conv1d(d_model, d_model, kernel_size, padding=(kernel_size - 1) // 2, groups=d_model)
        self.norm = nn.LayerNorm(d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, mask):
        y = F.glu(self.pointwise(self.layer_norm(x).transpose(1, 2)), dim=1)
        y = self.depthwise(y * mask[:, None, :]).transpose(1, 2)  # padded frames read as zeros
        return self.drop(self.proj(F.gelu(self.norm(y))))


class ConMambaLayer(nn.Module):
    """x += FFN/2; x += BiMamba(LN x); x += Conv(x); x = LN(x + FFN/2) (Mamba-ASR's layer order)."""

    def __init__(self, d_model: int, d_ffn: int, kernel_size: int = 31, dropout: float = 0.0, d_state: int = 16, expand: int = 2, d_conv: int = 4):
        super().__init__()
        self.ffn1 = FeedForward(d_model, d_ffn, dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.mamba = BiMamba(d_model, d_state=d_state, expand=expand, d_conv=d_conv)
        self.conv = ConvModule(d_model, kernel_size, dropout)
        self.ffn2 = FeedForward(d_model, d_ffn, dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, x, mask, packed: bool = True):
        x = x + 0.5 * self.ffn1(x)
        x = x + packed_mamba(self.mamba, self.norm1(x), mask if packed else None)
        x = x + self.conv(x, mask)
        return self.norm2(x + 0.5 * self.ffn2(x))


class MambaSpeechEncoder(nn.Module):
    """Front end + 4x subsampling + Mamba encoder + head.

    Args:
        layer_type: "conmamba" (Conformer layout, bidirectional Mamba) or "mamba" (residual
            RMSNorm -> Mamba blocks; bidirectional unless ``causal``).
        causal: unidirectional Mamba and causal subsampling, so ``forward_stream`` can run the
            encoder chunk by chunk (needs layer_type="mamba").
        head: "ctc" (per-frame logits over ``num_classes`` tokens, index 0 the blank) or
            "classify" (masked mean over frames).
    """

    def __init__(
        self,
        num_classes: int = 31,
        d_model: int = 256,
        depth: int = 18,
        d_ffn: int = 1024,
        layer_type: str = "conmamba",
        head: str = "ctc",
        causal: bool = False,
        n_mels: int = 80,
        sample_rate: int = 16000,
        frontend: str = "fbank",
        kernel_size: int = 31,
        d_state: int = 16,
        expand: int = 2,
        dropout: float = 0.1,
        spec_augment: bool = True,
        subsampling_channels: Sequence[int] = (64, 32),
    ):
        super().__init__()
        if layer_type not in ("conmamba", "mamba"):
            raise ValueError(f"MambaSpeechEncoder: layer_type must be 'conmamba' or 'mamba', got {layer_type!r}")
        if head not in ("ctc", "classify"):
            raise ValueError(f"MambaSpeechEncoder: head must be 'ctc' or 'classify', got {head!r}")
        if causal and layer_type != "mamba":
            raise ValueError("MambaSpeechEncoder: causal=True needs layer_type='mamba' (ConMamba's conv module looks ahead)")
        check_num_classes("MambaSpeechEncoder", num_classes)
        check_sizes("MambaSpeechEncoder", d_model=d_model, depth=depth, d_ffn=d_ffn, n_mels=n_mels, sample_rate=sample_rate,
                    kernel_size=kernel_size)
        check_rates("MambaSpeechEncoder", dropout=dropout)
        self.num_classes, self.head_type, self.causal, self.layer_type = num_classes, head, causal, layer_type
        self.num_features = self.head_hidden_size = self.embed_dim = d_model
        self.frontend = SpeechFrontend(n_mels, sample_rate, frontend, normalize="global" if causal else "utterance")
        self.spec_augment = SpecAugment() if spec_augment else nn.Identity()
        self.subsample = ConvSubsampling(n_mels, d_model, subsampling_channels, causal=causal)
        self.drop = nn.Dropout(dropout)
        if layer_type == "conmamba":
            self.layers = nn.ModuleList(
                ConMambaLayer(d_model, d_ffn, kernel_size, dropout, d_state, expand) for _ in range(depth)
            )
            self.norm = nn.LayerNorm(d_model, eps=1e-6)
        else:
            mixer = Mamba if causal else BiMamba
            self.layers = nn.ModuleList(
                ResidualBlock(d_model, mixer(d_model, d_state=d_state, expand=expand, layer_idx=i), RMSNorm(d_model))
                for i in range(depth)
            )
            self.norm = RMSNorm(d_model)
        self.head = nn.Linear(d_model, num_classes) if num_classes > 0 else nn.Identity()
        self.grad_checkpointing = False

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each encoder layer's activations in the backward instead of keeping them."""
        self.grad_checkpointing = enable

    def forward_features(self, wave: torch.Tensor, num_samples: Optional[torch.Tensor] = None):
        """Waveforms (b, samples) -> encoder output (b, T', d_model) and valid frame counts (b,)."""
        feats, frames = self.frontend(wave, num_samples)
        if isinstance(self.spec_augment, SpecAugment):
            feats = self.spec_augment(feats, frames)
        return self.encode(feats, frames, padded=num_samples is not None)

    def encode(self, feats: torch.Tensor, frames: torch.Tensor, padded: bool = True):
        """Features (b, T, n_mels) with valid frame counts -> (b, T/4, d_model), counts. ``padded=False`` says every
        utterance fills all T frames: the Mamba layers then run on the batch as it is, not packed by frame counts
        (shapes that do not depend on values: one torch.compile graph)."""
        x, frames = self.subsample(feats, frames)
        mask = lengths_to_mask(frames, x.shape[1])
        x = self.drop(x)
        checkpointed = self.grad_checkpointing and torch.is_grad_enabled()

        def run(fn, *args, **kwargs):
            if checkpointed:
                return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs)
            return fn(*args, **kwargs)

        if self.layer_type == "conmamba":
            for layer in self.layers:
                x = run(layer, x, mask, packed=padded)
            x = self.norm(x)
        else:
            residual = None
            for block in self.layers:
                x, residual = add_norm(x, residual, block.norm, block.drop_path, block.residual_in_fp32)
                x = run(packed_mamba, block.mixer, x, mask if padded else None)
            x, _ = add_norm(x, residual, self.norm)
        return x * mask[..., None], frames

    def forward_head(self, x: torch.Tensor, frames: Optional[torch.Tensor] = None, pre_logits: bool = False):
        """Encoder output (b, T', d_model) -> logits; the classify head averages the valid frames (``frames``:
        their counts, as forward_features returns them; None: all T' frames). ``pre_logits``: the averaged
        features (classify, (b, d_model)) or the frames (CTC, (b, T', d_model))."""
        if self.head_type == "classify":
            if frames is None:
                x = x.mean(1)
            else:
                mask = lengths_to_mask(frames, x.shape[1])[..., None]
                x = (x * mask).sum(1) / frames[:, None].clamp(min=1)
        return x if pre_logits else self.head(x)

    def forward(self, wave: torch.Tensor, num_samples: Optional[torch.Tensor] = None):
        """CTC head: (log-probabilities (b, T', classes), frame counts); classify head: logits (b, classes)."""
        x, frames = self.forward_features(wave, num_samples)
        out = self.forward_head(x, frames)
        if self.head_type == "ctc":
            return out.log_softmax(-1), frames
        return out

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int):
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def no_weight_decay(self):
        return {n for n, _ in self.named_parameters() if n.endswith(("A_log", "A_b_log", ".D", ".D_b"))}

    @torch.no_grad()
    def forward_stream(self, feats: torch.Tensor, state: Optional[dict] = None):
        """Streaming for the causal configuration: normalised feature frames (b, n, n_mels) in, any n >= 0, encoder
        frames (b, k, d_model) out, plus the state to pass with the next chunk. The concatenated outputs of a whole
        utterance fed in chunks of any sizes equal ``encode`` of the whole utterance (tested): encoder frame k needs
        feature frame 4k and the frames before it, so it comes out with the chunk that brings feature frame 4k,
        and nothing is left to flush at the end. Features come from ``self.frontend`` (``StreamingTranscriber``
        runs the front end on waveform chunks too).

        The state holds, per subsampling stage, the input frames not yet consumed (with the two frames before
        them that play the role of the causal left padding), and each Mamba layer's conv and SSM state."""
        if not self.causal:
            raise RuntimeError("forward_stream needs a causal model (causal=True, layer_type='mamba')")
        if feats.dim() != 3 or feats.shape[2] != self.frontend.n_mels:
            raise ValueError(f"forward_stream: expected features (batch, frames, {self.frontend.n_mels}), got shape "
                             f"{tuple(feats.shape)}")
        state = state or {"sub1": None, "sub2": None, "layers": [None] * len(self.layers)}
        sub = self.subsample
        x = feats[:, None]
        for key, conv, norm in (("sub1", sub.conv1, sub.norm1), ("sub2", sub.conv2, sub.norm2)):
            # Output j of a stage reads its input frames 2j-2, 2j-1, 2j (frames before 0: the zero left padding).
            # buf starts at input frame 2j-2 of the next output j to produce.
            past = state[key] if state[key] is not None else x.new_zeros(*x.shape[:2], 2, x.shape[3])
            buf = torch.cat([past, x], dim=2)
            n_out = (buf.shape[2] - 1) // 2
            state[key] = buf[:, :, 2 * n_out :]
            if n_out == 0:
                return feats.new_zeros(feats.shape[0], 0, self.embed_dim), state
            x = F.leaky_relu(norm(conv(buf[:, :, : 2 * n_out + 1]).transpose(1, -1)).transpose(1, -1))
        x = sub.out(x.permute(0, 2, 1, 3).flatten(2))
        residual = None
        for i, block in enumerate(self.layers):
            x, residual = add_norm(x, residual, block.norm, block.drop_path, block.residual_in_fp32)
            layer_state = state["layers"][i]
            if x.shape[1] == 1 and layer_state is not None:
                # One frame (short chunks): the decode step's one-step state update, same result, ~3x less time.
                x, state["layers"][i] = block.mixer.step(x, layer_state)
            else:
                x, state["layers"][i] = block.mixer.forward_stream(x, layer_state)
        x, _ = add_norm(x, residual, self.norm)
        return x, state

    def stream(self, **kwargs) -> "StreamingTranscriber":
        """A ``StreamingTranscriber`` over this (causal, CTC) model: feed waveform chunks, get tokens as they come."""
        return StreamingTranscriber(self, **kwargs)


class StreamingTranscriber:
    """Chunk-by-chunk transcription with a causal CTC model (``mamba_ctc_causal_tiny``).

    Feed waveform chunks of any length (``(samples,)`` for one stream or ``(batch, samples)`` for streams that
    advance together); each call returns the tokens decoded so far from that chunk (greedy CTC: repeats merged
    across chunk boundaries, blanks dropped). The carried state is the unconsumed samples (less than one 25 ms
    window), the subsampling stages' pending frames, and each Mamba layer's conv and SSM state, so memory and
    the cost per chunk do not grow with the stream. The concatenated log-probabilities equal the full pass
    ``model(wave)`` on the whole waveform, and so does the transcript (tested in float64 with chunk sizes that do
    not divide the length)::

        model = zoo.create_model("mamba_ctc_causal_tiny", checkpoint_path="digits.safetensors").eval()
        stream = model.stream()
        for chunk in chunks:                     # e.g. 100 ms of 16 kHz audio each
            new_tokens = stream.accept(chunk)    # tokens 1..10 are the digits 0..9, 0 the blank
        tokens = stream.tokens[0]                # the whole transcript so far (one list per stream)

    ``keep_log_probs=True`` keeps every emitted frame's log-probabilities in ``log_probs`` (tests, inspection).
    """

    def __init__(self, model: MambaSpeechEncoder, blank: int = 0, keep_log_probs: bool = False):
        if not getattr(model, "causal", False) or model.head_type != "ctc":
            raise RuntimeError("StreamingTranscriber needs a causal CTC model (causal=True, layer_type='mamba', head='ctc'), "
                               f"got causal={getattr(model, 'causal', None)}, head={getattr(model, 'head_type', None)!r}")
        if model.training:
            raise RuntimeError("StreamingTranscriber: put the model in eval mode first (model.eval()): dropout and "
                               "SpecAugment would make chunks differ from the full pass")
        self.model, self.blank, self.keep_log_probs = model, blank, keep_log_probs
        self.reset()

    def reset(self) -> None:
        """Start a new stream (the model is kept)."""
        self._samples = None
        self._state = None
        self._prev = None
        self.tokens: List[List[int]] = []
        self._log_probs: List[torch.Tensor] = []
        self.frames = 0  # encoder frames emitted so far

    @property
    def log_probs(self) -> torch.Tensor:
        """(batch, frames, classes): every frame emitted so far (needs keep_log_probs=True)."""
        if not self.keep_log_probs:
            raise RuntimeError("StreamingTranscriber: log_probs are kept only with keep_log_probs=True")
        return torch.cat(self._log_probs, 1)

    @torch.no_grad()
    def accept(self, chunk: torch.Tensor) -> List[List[int]]:
        """One waveform chunk (samples,) or (batch, samples) -> the new tokens: a list for a (samples,) chunk, a list
        per stream for (batch, samples)."""
        single = chunk.dim() == 1
        if chunk.dim() not in (1, 2):
            raise ValueError(f"StreamingTranscriber.accept: expected a waveform chunk (samples,) or (batch, samples), "
                             f"got shape {tuple(chunk.shape)}")
        wave = chunk[None] if single else chunk
        if self._samples is not None and self._samples.shape[0] != wave.shape[0]:
            raise ValueError(f"StreamingTranscriber.accept: the stream has batch {self._samples.shape[0]}, "
                             f"this chunk has batch {wave.shape[0]}")
        fe = self.model.frontend
        buf = wave if self._samples is None else torch.cat([self._samples, wave.to(self._samples.dtype)], 1)
        n_frames = (buf.shape[1] - fe.win) // fe.hop + 1 if buf.shape[1] >= fe.win else 0
        if not self.tokens:
            self.tokens = [[] for _ in range(buf.shape[0])]
            self._prev = [None] * buf.shape[0]
        new: List[List[int]] = [[] for _ in range(buf.shape[0])]
        if n_frames == 0:
            self._samples = buf
            return new[0] if single else new
        # Frames are independent 25 ms windows every 10 ms (Kaldi's snip_edges): the next frame starts n_frames hops on.
        feats, _ = fe(buf[:, : (n_frames - 1) * fe.hop + fe.win])
        self._samples = buf[:, n_frames * fe.hop :]
        x, self._state = self.model.forward_stream(feats, self._state)
        if x.shape[1] == 0:
            return new[0] if single else new
        log_probs = self.model.forward_head(x).log_softmax(-1)
        if self.keep_log_probs:
            self._log_probs.append(log_probs)
        self.frames += x.shape[1]
        for i, seq in enumerate(log_probs.argmax(-1).tolist()):
            for t in seq:
                if t != self._prev[i] and t != self.blank:
                    new[i].append(t)
                self._prev[i] = t
            self.tokens[i].extend(new[i])
        return new[0] if single else new


def ctc_greedy_decode(log_probs: torch.Tensor, frames: torch.Tensor, blank: int = 0) -> List[List[int]]:
    """Best path: argmax per frame, merge repeats, drop blanks."""
    best = log_probs.argmax(-1)
    out = []
    for seq, n in zip(best.tolist(), frames.tolist()):
        tokens, prev = [], None
        for t in seq[:n]:
            if t != prev and t != blank:
                tokens.append(t)
            prev = t
        out.append(tokens)
    return out


@register_model
def conmamba_ctc_large(pretrained: bool = False, **kwargs):
    """ConMamba CTC encoder of Mamba-ASR's hparams/CTC/conmamba_large.yaml: d_model 256, 18 layers,
    d_ffn 1024, bidirectional Mamba (d_state 16, expand 2, d_conv 4), 31 characters."""
    cfg = dict(num_classes=31, d_model=256, depth=18, d_ffn=1024, layer_type="conmamba", head="ctc")
    return build_model(MambaSpeechEncoder, "conmamba_ctc_large", pretrained, **{**cfg, **kwargs})


@register_model
def mamba_kws_tiny(pretrained: bool = False, **kwargs):
    """Plain bidirectional Mamba stack for keyword spotting (zoo.data.speech corpus)."""
    cfg = dict(num_classes=22, d_model=96, depth=4, layer_type="mamba", head="classify", dropout=0.1,
               subsampling_channels=(16, 16))
    return build_model(MambaSpeechEncoder, "mamba_kws_tiny", pretrained, **{**cfg, **kwargs})


@register_model
def mamba_ctc_tiny(pretrained: bool = False, **kwargs):
    """Bidirectional Mamba stack (utterance-normalised fbank, bidirectional Mamba blocks) with a CTC head over digits
    (blank + 10): the offline counterpart of mamba_ctc_causal_tiny, same sizes."""
    cfg = dict(num_classes=11, d_model=96, depth=4, layer_type="mamba", head="ctc", causal=False, dropout=0.1,
               subsampling_channels=(16, 16))
    return build_model(MambaSpeechEncoder, "mamba_ctc_tiny", pretrained, **{**cfg, **kwargs})


@register_model
def mamba_ctc_causal_tiny(pretrained: bool = False, **kwargs):
    """Causal, streamable unidirectional Mamba stack with a CTC head over digits (blank + 10)."""
    cfg = dict(num_classes=11, d_model=96, depth=4, layer_type="mamba", head="ctc", causal=True, dropout=0.1,
               subsampling_channels=(16, 16))
    return build_model(MambaSpeechEncoder, "mamba_ctc_causal_tiny", pretrained, **{**cfg, **kwargs})
