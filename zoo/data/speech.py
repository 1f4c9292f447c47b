"""Speech made here: a keyword-spotting corpus and spoken digit strings, synthesized with espeak-ng.

No download: espeak-ng (Debian package ``espeak-ng``) speaks each item in many voices (English
accents x voice variants), speeds and pitches; clips are resampled to 16 kHz and cached as FLAC
through soundfile, with a JSON manifest. Test voices are voice variants never used in training,
so the test measures generalisation to unseen speakers. Noise is added at load time (random SNR
for training, a fixed seeded SNR for evaluation).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from torch.utils.data import Dataset

COMMANDS = ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go", "forward", "backward"]
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
KEYWORDS = COMMANDS + DIGITS
ACCENTS = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029", "en-us-nyc"]
TRAIN_VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m6", "f1", "f2", "f3", "f5", "klatt", "klatt3", "klatt4",
                  "Andy", "Annie", "benjamin", "grandma", "john", "linda", "travis"]
TEST_VARIANTS = ["m7", "f4", "klatt2", "edward", "steph"]
SAMPLE_RATE = 16000
CORPUS_VERSION = 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("ZOO_CACHE", Path.home() / ".cache" / "mamba-zoo")) / "speech"


def _espeak() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError(
            "espeak-ng is not installed; the speech corpus is synthesized with it. "
            "Install the Debian package: apt-get install espeak-ng"
        )
    return exe


def synthesize(text: str, voice: str, speed: int, pitch: int) -> torch.Tensor:
    """One utterance as a float32 waveform at 16 kHz."""
    import soundfile as sf
    import torchaudio.functional as AF

    with tempfile.NamedTemporaryFile(suffix=".wav") as f:
        subprocess.run([_espeak(), "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", f.name, text],
                       check=True, capture_output=True)
        wave, sr = sf.read(f.name, dtype="float32")
    wave = torch.from_numpy(wave)
    return AF.resample(wave, sr, SAMPLE_RATE) if sr != SAMPLE_RATE else wave


def build_corpus(kind: str = "kws", cache_dir: Optional[Path] = None, n_strings: int = 1200, seed: int = 0,
                 voices_per_split: Optional[int] = None, progress: bool = True) -> Path:
    """Synthesize the corpus once and return its directory (cached by content key).

    kind="kws": every keyword in every voice. kind="digits": ``n_strings`` random digit strings of
    2-5 digits, each in a random voice of its split (80% train voices, 20% test voices).
    """
    if kind not in ("kws", "digits"):
        raise ValueError(f"build_corpus: kind must be 'kws' or 'digits', got {kind!r}")
    import soundfile as sf
    from tqdm import tqdm

    key = json.dumps([CORPUS_VERSION, kind, n_strings, seed, voices_per_split, ACCENTS, TRAIN_VARIANTS, TEST_VARIANTS, KEYWORDS])
    root = Path(cache_dir or default_cache_dir()) / f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (root / "manifest.json").exists():
        return root
    rng = random.Random(seed)
    voices = {split: [f"{a}+{v}" for a in ACCENTS for v in variants]
              for split, variants in (("train", TRAIN_VARIANTS), ("test", TEST_VARIANTS))}
    if voices_per_split:
        voices = {k: rng.sample(v, min(voices_per_split, len(v))) for k, v in voices.items()}
    items = []
    if kind == "kws":
        for split, vs in voices.items():
            for v in vs:
                for label, word in enumerate(KEYWORDS):
                    items.append(dict(split=split, voice=v, text=word, label=label))
    else:
        for i in range(n_strings):
            split = "test" if i % 5 == 4 else "train"
            digits = [rng.randrange(10) for _ in range(rng.randint(2, 5))]
            items.append(dict(split=split, voice=rng.choice(voices[split]), text=" ".join(DIGITS[d] for d in digits),
                              label="".join(map(str, digits))))
    tmp = root.with_name(root.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    for i, item in enumerate(tqdm(items, desc=f"synthesizing {kind} corpus", disable=not progress)):
        item["speed"], item["pitch"] = rng.randint(120, 210), rng.randint(25, 75)
        item["file"] = f"{i:05d}.flac"
        if not (tmp / item["file"]).exists():  # resumes an interrupted build
            wave = synthesize(item["text"], item["voice"], item["speed"], item["pitch"])
            sf.write(tmp / item["file"], wave.numpy(), SAMPLE_RATE)
    (tmp / "manifest.json").write_text(json.dumps(dict(kind=kind, sample_rate=SAMPLE_RATE, items=items), indent=0))
    tmp.rename(root)
    return root


class SynthSpeech(Dataset):
    """Items of a built corpus for one split: (waveform, label) with noise mixed in.

    ``label`` is the keyword index (kws) or the digit string (digits). ``snr_db``: (low, high)
    range of the added white noise's signal-to-noise ratio; drawn per access in training, fixed
    per item (seeded) otherwise.
    """

    def __init__(self, root: Path, split: str, train: bool = False, snr_db: Sequence[float] = (10.0, 30.0), seed: int = 0):
        if split not in ("train", "test"):
            raise ValueError(f"SynthSpeech: split must be 'train' or 'test', got {split!r}")
        manifest = json.loads((Path(root) / "manifest.json").read_text())
        self.root, self.kind = Path(root), manifest["kind"]
        self.items = [it for it in manifest["items"] if it["split"] == split]
        self.train, self.snr_db, self.seed = train, snr_db, seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        import soundfile as sf

        item = self.items[i]
        wave, _ = sf.read(self.root / item["file"], dtype="float32")
        wave = torch.from_numpy(wave)
        g = None if self.train else torch.Generator().manual_seed(self.seed * 100003 + i)
        snr = self.snr_db[0] + (self.snr_db[1] - self.snr_db[0]) * float(torch.rand((), generator=g))
        noise = torch.randn(wave.shape, generator=g)
        scale = wave.pow(2).mean().sqrt() / (10 ** (snr / 20)) / noise.pow(2).mean().sqrt().clamp(min=1e-8)
        return wave + scale * noise, item["label"]


def collate_waves(batch):
    """[(wave, label)] -> (padded waves (b, max_samples), num_samples (b,), labels list)."""
    waves, labels = zip(*batch)
    lengths = torch.tensor([w.shape[0] for w in waves])
    padded = torch.zeros(len(waves), int(lengths.max()))
    for i, w in enumerate(waves):
        padded[i, : w.shape[0]] = w
    return padded, lengths, list(labels)


def digits_to_targets(labels: List[str]):
    """Digit strings -> CTC targets (concatenated, tokens 1..10 for digits 0..9) and lengths."""
    targets = torch.tensor([int(c) + 1 for s in labels for c in s], dtype=torch.long)
    return targets, torch.tensor([len(s) for s in labels], dtype=torch.long)
