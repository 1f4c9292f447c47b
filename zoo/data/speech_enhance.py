"""Noisy speech for enhancement: the espeak-ng digit-string corpus of zoo.data.speech with noise mixed in.

Nothing is downloaded and nothing beyond the clean corpus is stored: every noisy clip is made at load time,
deterministically from a seed. Training draws a noise type from ``TRAIN_NOISES`` and an SNR from
``TRAIN_SNRS`` at every access (a generator seeded once, so a run is repeatable); the test split is fixed
per item (seeded by the item's index) and uses noise types AND SNRs that training never sees
(``TEST_NOISES``, ``TEST_SNRS``), on the corpus's held-out voices. The layout follows VoiceBank-DEMAND
(training SNRs 0/5/10/15 dB, test SNRs between them), with one test SNR below the training range.

Noise types:
  white            Gaussian white noise
  pink             1/f power (FFT-shaped white noise)
  babble           3-6 other utterances of the same split, each at a random offset, summed
  hum              mains hum: 50 or 60 Hz and 4-12 harmonics with random amplitudes and phases, plus a little
                   white noise
  brown (test)     1/f^2 power
  siren (test)     a frequency-modulated tone (600-1500 Hz, swept 0.3-2 times a second) and its 2nd harmonic
  reverb_babble (test)  babble convolved (torchaudio.functional.fftconvolve) with a synthetic room impulse
                   response: exponentially decaying noise with RT60 0.3-0.9 s
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch.utils.data import Dataset

from .speech import SAMPLE_RATE

TRAIN_NOISES = ("white", "pink", "babble", "hum")
TEST_NOISES = ("brown", "siren", "reverb_babble")
NOISE_TYPES = TRAIN_NOISES + TEST_NOISES
TRAIN_SNRS = (0.0, 5.0, 10.0, 15.0)
TEST_SNRS = (-2.5, 2.5, 7.5, 12.5)


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=g))


def colored_noise(n: int, exponent: float, g: torch.Generator) -> torch.Tensor:
    """Noise with power spectrum 1/f^exponent (0 white, 1 pink, 2 brown), unit RMS."""
    spec = torch.fft.rfft(torch.randn(n, generator=g))
    f = torch.arange(spec.shape[0], dtype=torch.float32)
    f[0] = 1.0
    x = torch.fft.irfft(spec / f.pow(exponent / 2), n=n)
    x = x - x.mean()
    return x / x.pow(2).mean().sqrt().clamp(min=1e-8)


def hum(n: int, g: torch.Generator, sr: int = SAMPLE_RATE) -> torch.Tensor:
    f0 = 50.0 if float(torch.rand((), generator=g)) < 0.5 else 60.0
    t = torch.arange(n) / sr
    x = torch.zeros(n)
    for k in range(1, int(torch.randint(4, 13, (), generator=g)) + 1):
        x += _uniform(g, 0.2, 1.0) / k ** 0.5 * torch.sin(2 * math.pi * f0 * k * t + _uniform(g, 0, 2 * math.pi))
    x = x / x.pow(2).mean().sqrt().clamp(min=1e-8)
    return x + 0.05 * torch.randn(n, generator=g)


def siren(n: int, g: torch.Generator, sr: int = SAMPLE_RATE) -> torch.Tensor:
    t = torch.arange(n) / sr
    low, high, rate = _uniform(g, 600, 900), _uniform(g, 1100, 1500), _uniform(g, 0.3, 2.0)
    freq = low + (high - low) * 0.5 * (1 + torch.sin(2 * math.pi * rate * t + _uniform(g, 0, 2 * math.pi)))
    phase = 2 * math.pi * torch.cumsum(freq, 0) / sr
    return torch.sin(phase) + 0.3 * torch.sin(2 * phase)


def room_impulse_response(g: torch.Generator, sr: int = SAMPLE_RATE) -> torch.Tensor:
    """Exponentially decaying Gaussian noise with a random RT60 in 0.3-0.9 s, a direct path first, unit energy."""
    rt60 = _uniform(g, 0.3, 0.9)
    n = int(rt60 * sr)
    t = torch.arange(n) / sr
    rir = torch.randn(n, generator=g) * torch.exp(-6.9 * t / rt60)  # -60 dB at rt60
    rir[0] = 1.0
    return rir / rir.pow(2).sum().sqrt()


def mix_at_snr(clean: torch.Tensor, noise: torch.Tensor, snr_db: float) -> torch.Tensor:
    """clean + noise scaled so that 10 log10(P_clean / P_noise) = snr_db."""
    p_clean = clean.pow(2).mean()
    p_noise = noise.pow(2).mean().clamp(min=1e-12)
    return clean + noise * torch.sqrt(p_clean / (p_noise * 10 ** (snr_db / 10)))


class NoisySpeech(Dataset):
    """(noisy, clean, info) for one split of a built digits corpus (``zoo.data.speech.build_corpus("digits")``).

    Args:
        root: the corpus directory.
        split: "train" (training voices) or "test" (held-out voices).
        train: draw noise, SNR and crop anew at every access (from a generator seeded with ``seed``); else the
            mixture of item i is fixed by (seed, i).
        noise_types, snrs: default: the split's (``TRAIN_*`` for train, ``TEST_*`` for test).
        segment: crop (or zero-pad) every clip to this many samples (training batches); None: whole clips.
    """

    def __init__(self, root, split: str, train: bool = False, seed: int = 0, noise_types: Optional[Sequence[str]] = None,
                 snrs: Optional[Sequence[float]] = None, segment: Optional[int] = None, limit: Optional[int] = None):
        if split not in ("train", "test"):
            raise ValueError(f"NoisySpeech: split must be 'train' or 'test', got {split!r}")
        manifest = json.loads((Path(root) / "manifest.json").read_text())
        if manifest["sample_rate"] != SAMPLE_RATE:
            raise ValueError(f"NoisySpeech: expected a {SAMPLE_RATE} Hz corpus, got {manifest['sample_rate']}")
        self.root, self.split, self.train, self.seed, self.segment = Path(root), split, train, seed, segment
        self.items = [it for it in manifest["items"] if it["split"] == split][:limit]
        if len(self.items) < 2:
            raise ValueError(f"NoisySpeech: the {split} split of {root} has {len(self.items)} items; babble needs >= 2")
        self.noise_types = tuple(noise_types or (TRAIN_NOISES if split == "train" else TEST_NOISES))
        unknown = sorted(set(self.noise_types) - set(NOISE_TYPES))
        if unknown:
            raise ValueError(f"NoisySpeech: unknown noise types {unknown}; expected some of {list(NOISE_TYPES)}")
        self.snrs = tuple(float(s) for s in (snrs or (TRAIN_SNRS if split == "train" else TEST_SNRS)))
        self._g = torch.Generator().manual_seed(seed)
        self._cache: Dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.items)

    def clean(self, i: int) -> torch.Tensor:
        if i not in self._cache:
            import soundfile as sf

            wave, _ = sf.read(self.root / self.items[i]["file"], dtype="float32")
            self._cache[i] = torch.from_numpy(wave)
        return self._cache[i]

    def _babble(self, i: int, n: int, g: torch.Generator) -> torch.Tensor:
        out = torch.zeros(n)
        others = [j for j in range(len(self.items)) if j != i]
        for _ in range(int(torch.randint(3, 7, (), generator=g))):
            w = self.clean(others[int(torch.randint(len(others), (), generator=g))])
            w = w / w.pow(2).mean().sqrt().clamp(min=1e-8)
            reps = w.repeat(n // w.shape[0] + 2)
            start = int(torch.randint(w.shape[0], (), generator=g))
            out += reps[start:start + n]
        return out

    def noise(self, kind: str, i: int, n: int, g: torch.Generator) -> torch.Tensor:
        if kind in ("white", "pink", "brown"):
            return colored_noise(n, {"white": 0.0, "pink": 1.0, "brown": 2.0}[kind], g)
        if kind == "hum":
            return hum(n, g)
        if kind == "siren":
            return siren(n, g)
        if kind == "babble":
            return self._babble(i, n, g)
        if kind == "reverb_babble":
            from torchaudio.functional import fftconvolve

            return fftconvolve(self._babble(i, n, g), room_impulse_response(g))[:n]
        raise ValueError(f"unknown noise type {kind!r}")

    def __getitem__(self, i: int):
        g = self._g if self.train else torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        clean = self.clean(i)
        if self.segment:
            if clean.shape[0] > self.segment:
                start = int(torch.randint(clean.shape[0] - self.segment + 1, (), generator=g))
                clean = clean[start:start + self.segment]
            else:
                clean = torch.nn.functional.pad(clean, (0, self.segment - clean.shape[0]))
        kind = self.noise_types[int(torch.randint(len(self.noise_types), (), generator=g))]
        snr = self.snrs[int(torch.randint(len(self.snrs), (), generator=g))]
        noisy = mix_at_snr(clean, self.noise(kind, i, clean.shape[0], g), snr)
        return noisy, clean, dict(index=i, noise=kind, snr=snr, text=self.items[i]["text"], voice=self.items[i]["voice"])


def collate_pairs(batch):
    """Equal-length (noisy, clean, info) items -> (noisy (b, n), clean (b, n), [info])."""
    noisy, clean, info = zip(*batch)
    return torch.stack(noisy), torch.stack(clean), list(info)


def noise_summary() -> Dict[str, List]:
    return dict(train_noises=list(TRAIN_NOISES), test_noises=list(TEST_NOISES), train_snrs=list(TRAIN_SNRS),
                test_snrs=list(TEST_SNRS))
