"""Speech made here: a keyword-spotting corpus, spoken digit strings and spoken words / short sentences,
synthesized with espeak-ng.

No download: espeak-ng (Debian package ``espeak-ng``) speaks each item in many voices (English
accents x voice variants), speeds and pitches; clips are resampled to 16 kHz and cached as FLAC
through soundfile, with a JSON manifest. Test voices are voice variants never used in training,
so the test measures generalisation to unseen speakers. Noise is added at load time (random SNR
for training, a fixed seeded SNR for evaluation), and optionally reverberation (a synthetic room
impulse response: exponentially decaying noise, convolved with torchaudio's fftconvolve).

The sentence task (kind="sentences") speaks single words and short sentences made offline by
``make_sentences`` from an embedded vocabulary and templates (no text download; the same seed
gives the same texts). Targets are characters: lowercase letters, space and apostrophe
(``CHARS``; ``text_to_tokens`` maps them to 1..28, 0 is the CTC blank).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
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
# Sentence task: characters spoken (token k is CHARS[k - 1]; 0 is the CTC blank / padding).
CHARS = " 'abcdefghijklmnopqrstuvwxyz"

# Embedded vocabulary of the sentence task (words written as espeak-ng should say them; apostrophes kept).
_DET = ["the", "a", "my", "your", "his", "her", "our", "this", "that", "every"]
_ADJ = ["big", "small", "red", "green", "blue", "old", "young", "happy", "quiet", "loud", "cold", "warm", "dark",
        "bright", "fast", "slow", "tall", "short", "clever", "lazy"]
_NOUN = ["dog", "cat", "bird", "horse", "fish", "child", "teacher", "farmer", "doctor", "king", "queen", "house",
         "garden", "river", "tree", "book", "table", "window", "door", "road", "city", "ship", "car", "apple", "bread",
         "water", "letter", "song", "boat", "mountain"]
_VERB_PAST = ["saw", "found", "liked", "opened", "closed", "painted", "carried", "watched", "followed", "wanted",
              "bought", "sold", "took", "gave", "made", "left", "knew", "heard", "moved", "cleaned"]
_VERB = ["see", "find", "like", "open", "close", "paint", "carry", "watch", "follow", "want", "buy", "sell", "take",
         "make", "leave", "know", "hear", "move", "clean", "read"]
_PRON = ["i", "you", "we", "they", "she", "he"]
_CONTRACTED = ["i'm", "you're", "we're", "they're", "she's", "he's", "it's"]
_NEG = ["don't", "can't", "won't", "didn't", "couldn't", "shouldn't"]
_PREP = ["in", "on", "near", "under", "behind", "over", "by"]
_TIME = ["today", "yesterday", "tomorrow", "tonight", "again", "now", "later"]
_TEMPLATES = [
    "{det} {noun} {past} {det} {noun}",
    "{det} {adj} {noun} {past} {det} {adj} {noun}",
    "{pron} {past} {det} {noun} {time}",
    "{pron} {neg} {verb} {det} {noun}",
    "{contr} {adj}",
    "{contr} {prep} {det} {noun}",
    "{det} {noun} is {prep} {det} {noun}",
    "{det} {noun}'s {noun} is {adj}",
    "{pron} will {verb} {det} {adj} {noun}",
    "where is {det} {noun}",
    "{pron} {past} it {time}",
]
SENTENCE_WORDS = sorted(set(_DET + _ADJ + _NOUN + _VERB_PAST + _VERB + _PRON + _CONTRACTED + _NEG + _PREP + _TIME
                            + ["is", "will", "where", "it"]))


def make_sentences(n: int, seed: int = 0, word_fraction: float = 0.2) -> List[str]:
    """``n`` texts of the sentence task: single words (``word_fraction`` of them) and template sentences of 2-7
    words, lowercase, from the embedded vocabulary (deterministic in ``seed``). Every character is in ``CHARS``."""
    rng = random.Random(seed)
    pools = dict(det=_DET, adj=_ADJ, noun=_NOUN, past=_VERB_PAST, verb=_VERB, pron=_PRON, contr=_CONTRACTED, neg=_NEG,
                 prep=_PREP, time=_TIME)
    out = []
    for _ in range(n):
        if rng.random() < word_fraction:
            out.append(rng.choice(SENTENCE_WORDS))
            continue
        template = rng.choice(_TEMPLATES)
        out.append(re.sub(r"\{(\w+)\}", lambda m: rng.choice(pools[m.group(1)]), template))
    return out


def text_to_tokens(text: str) -> List[int]:
    """Sentence-task text -> character tokens 1..len(CHARS) (0 is the blank); other characters are an error."""
    bad = sorted(set(text) - set(CHARS))
    if bad:
        raise ValueError(f"text_to_tokens: characters {bad} are not in the sentence alphabet {CHARS!r} (text {text!r})")
    return [CHARS.index(c) + 1 for c in text]


def tokens_to_text(tokens: Sequence[int]) -> str:
    """Inverse of ``text_to_tokens`` (tokens outside 1..len(CHARS) are dropped)."""
    return "".join(CHARS[t - 1] for t in tokens if 1 <= t <= len(CHARS))


def texts_to_targets(labels: List[str]):
    """Sentence texts -> CTC targets (concatenated character tokens) and lengths."""
    seqs = [text_to_tokens(s) for s in labels]
    return torch.tensor([t for s in seqs for t in s], dtype=torch.long), torch.tensor([len(s) for s in seqs], dtype=torch.long)


def add_reverb(wave: torch.Tensor, rt60: float, generator: Optional[torch.Generator] = None,
               sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Convolve with a synthetic room impulse response: a direct path plus Gaussian noise decaying by 60 dB over
    ``rt60`` seconds (torchaudio.functional.fftconvolve); the result keeps the input's length and RMS."""
    import torchaudio.functional as AF

    n = max(2, int(rt60 * sample_rate))
    t = torch.arange(n, dtype=torch.float32) / sample_rate
    rir = torch.randn(n, generator=generator) * torch.exp(-6.9078 * t / rt60) * 0.3
    rir[0] = 1.0
    out = AF.fftconvolve(wave, rir)[: wave.shape[0]]
    return out * (wave.pow(2).mean().sqrt() / out.pow(2).mean().sqrt().clamp(min=1e-8))


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
    kind="sentences": ``n_strings`` words and short sentences (``make_sentences``), split the same way.
    Each item gets a random espeak-ng speed (120-210 words per minute) and pitch (25-75).
    """
    if kind not in ("kws", "digits", "sentences"):
        raise ValueError(f"build_corpus: kind must be 'kws', 'digits' or 'sentences', got {kind!r}")
    import soundfile as sf
    from tqdm import tqdm

    key = [CORPUS_VERSION, kind, n_strings, seed, voices_per_split, ACCENTS, TRAIN_VARIANTS, TEST_VARIANTS, KEYWORDS]
    if kind == "sentences":  # the texts are part of the content (digits / kws keep their former keys)
        key.append(make_sentences(n_strings, seed))
    key = json.dumps(key)
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
    elif kind == "sentences":
        for i, text in enumerate(make_sentences(n_strings, seed)):
            split = "test" if i % 5 == 4 else "train"
            items.append(dict(split=split, voice=rng.choice(voices[split]), text=text, label=text))
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

    ``label`` is the keyword index (kws), the digit string (digits) or the text (sentences). ``snr_db``:
    (low, high) range of the added white noise's signal-to-noise ratio; drawn per access in training,
    fixed per item (seeded) otherwise. ``reverb``: probability that an item is reverberated (``add_reverb``,
    RT60 drawn in ``rt60``), drawn the same way; 0 (default) leaves the audio dry.
    """

    def __init__(self, root: Path, split: str, train: bool = False, snr_db: Sequence[float] = (10.0, 30.0), seed: int = 0,
                 reverb: float = 0.0, rt60: Sequence[float] = (0.1, 0.5)):
        if not 0.0 <= reverb <= 1.0:
            raise ValueError(f"SynthSpeech: reverb is a probability in [0, 1], got {reverb}")
        if split not in ("train", "test"):
            raise ValueError(f"SynthSpeech: split must be 'train' or 'test', got {split!r}")
        manifest = json.loads((Path(root) / "manifest.json").read_text())
        self.root, self.kind = Path(root), manifest["kind"]
        self.items = [it for it in manifest["items"] if it["split"] == split]
        self.train, self.snr_db, self.seed, self.reverb, self.rt60 = train, snr_db, seed, reverb, rt60

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        import soundfile as sf

        item = self.items[i]
        wave, _ = sf.read(self.root / item["file"], dtype="float32")
        wave = torch.from_numpy(wave)
        g = None if self.train else torch.Generator().manual_seed(self.seed * 100003 + i)
        snr = self.snr_db[0] + (self.snr_db[1] - self.snr_db[0]) * float(torch.rand((), generator=g))
        if self.reverb > 0:  # draws only when enabled, so the noise of dry corpora is what it was
            u = torch.rand(2, generator=g)
            if float(u[0]) < self.reverb:
                wave = add_reverb(wave, self.rt60[0] + (self.rt60[1] - self.rt60[0]) * float(u[1]), g)
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
