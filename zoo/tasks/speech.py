"""Speech tasks on the synthesized corpora: keyword spotting (accuracy), digit strings and words / short sentences
(CER and WER), with CTC models (``head_type == "ctc"``) or encoder-decoder models (Samba-ASR, ``"seq2seq"``:
cross-entropy with teacher forcing, greedy or beam decoding)."""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch
from torch.utils.data import DataLoader
from torchaudio.functional import edit_distance  # the Levenshtein distance behind the CER
from tqdm import tqdm

from zoo.data.speech import (CHARS, DIGITS, SynthSpeech, build_corpus, collate_waves, text_to_tokens, tokens_to_text)
from zoo.tasks.engine import check_fields, check_output_file, number_arg, param_groups_weight_decay, write_text_atomic

# What each numeric argument of the task allows (number_arg / check_fields keywords).
LIMITS = dict(
    epochs=dict(kind=int, low=1), batch_size=dict(kind=int, low=1), lr=dict(kind=float, low=0, low_open=True),
    seed=dict(kind=int, low=0), voices_per_split=dict(kind=int, low=1, optional=True), n_strings=dict(kind=int, low=1),
    limit_batches=dict(kind=int, low=1, optional=True), beam=dict(kind=int, low=1),
    reverb=dict(kind=float, low=0, high=1),
)
TASKS = ("kws", "digits", "sentences")


def label_tokens(task: str, label: str) -> List[int]:
    """A digits / sentences label -> its symbol tokens (digits: 1..10 for 0..9; sentences: characters 1..28)."""
    return [int(c) + 1 for c in label] if task == "digits" else text_to_tokens(label)


def tokens_text(task: str, tokens: List[int]) -> str:
    return "".join(str(t - 1) for t in tokens) if task == "digits" else tokens_to_text(tokens)


def text_words(task: str, text: str) -> List[str]:
    """Words for the WER: the digit names (one per digit) or the space-separated words."""
    return [DIGITS[int(c)] for c in text] if task == "digits" else text.split()


def vocab_task(model) -> str:
    """Which label set a CTC / seq2seq model's head covers: "digits" (10 symbols) or "sentences" (28 characters)."""
    symbols = model.num_classes - (1 if model.head_type == "ctc" else 2)
    if symbols == 10:
        return "digits"
    if symbols == len(CHARS):
        return "sentences"
    raise ValueError(f"{type(model).__name__} with {model.num_classes} classes ({model.head_type} head) covers neither the "
                     f"digits (10 symbols) nor the characters {CHARS!r} ({len(CHARS)} symbols)")


def _loaders(task, corpus, batch_size, seed, reverb=0.0):
    train = SynthSpeech(corpus, "train", train=True, seed=seed, reverb=reverb)
    test = SynthSpeech(corpus, "test", train=False, seed=seed, reverb=reverb)
    g = torch.Generator().manual_seed(seed)
    return (DataLoader(train, batch_size, shuffle=True, collate_fn=collate_waves, generator=g),
            DataLoader(test, batch_size, shuffle=False, collate_fn=collate_waves))


def _step_loss(task, model, waves, lengths, labels):
    if task == "kws":
        logits = model(waves, lengths)
        return torch.nn.functional.cross_entropy(logits, torch.tensor(labels))
    tokens = [label_tokens(task, label) for label in labels]
    if model.head_type == "seq2seq":
        return model.loss(waves, lengths, tokens)
    log_probs, frames = model(waves, lengths)
    targets = torch.tensor([t for seq in tokens for t in seq], dtype=torch.long)
    target_lengths = torch.tensor([len(seq) for seq in tokens], dtype=torch.long)
    return torch.nn.functional.ctc_loss(log_probs.transpose(0, 1), targets, frames, target_lengths, blank=0,
                                        zero_infinity=True)


def transcribe_batch(model, waves, lengths, beam: int = 1) -> List[List[int]]:
    """Symbol tokens per utterance: greedy CTC (CTC models; ``beam`` must be 1) or greedy / beam-search decoding
    (seq2seq models)."""
    from zoo.models.speech.mamba_asr import ctc_greedy_decode

    if model.head_type == "seq2seq":
        return model.transcribe(waves, lengths, beam=beam)
    if beam != 1:
        raise ValueError(f"beam search is for encoder-decoder models (samba_asr_*); {type(model).__name__} decodes CTC greedily")
    log_probs, frames = model(waves, lengths)
    return ctc_greedy_decode(log_probs, frames)


@torch.no_grad()
def evaluate(task, model, loader, beam: int = 1, examples: int = 0):
    """kws: top-1 accuracy; digits / sentences: character and word error rates (torchaudio's edit distance) of the
    decoded transcripts. Digits: the words are the spoken digit names, one per digit, so the WER equals the CER
    (computed apart all the same); sentences: characters include the spaces, words are split on spaces.
    ``examples``: also return the first few (reference, hypothesis) pairs."""
    model.eval()
    hits = errors = total = word_errors = words = 0
    pairs = []
    for waves, lengths, labels in loader:
        if task == "kws":
            hits += int((model(waves, lengths).argmax(-1) == torch.tensor(labels)).sum())
            total += len(labels)
        else:
            for hyp, ref in zip(transcribe_batch(model, waves, lengths, beam), labels):
                hyp_text = tokens_text(task, hyp)
                errors += edit_distance(hyp_text, ref)
                total += len(ref)
                hyp_words, ref_words = text_words(task, hyp_text), text_words(task, ref)
                word_errors += edit_distance(hyp_words, ref_words)
                words += len(ref_words)
                if len(pairs) < examples:
                    pairs.append(dict(ref=ref, hyp=hyp_text))
    if task == "kws":
        return {"accuracy": hits / total}
    return dict(cer=errors / total, wer=word_errors / words, **(dict(examples=pairs) if examples else {}))


def run_speech_task(task: str = "kws", model_name: Optional[str] = None, epochs: int = 8, batch_size: int = 32,
                    lr: float = 2e-3, seed: int = 0, cache_dir: Optional[str] = None, output: Optional[str] = None,
                    voices_per_split: Optional[int] = None, n_strings: int = 1200, limit_batches: Optional[int] = None,
                    progress: bool = True, command: Optional[str] = None, save_weights: Optional[str] = None,
                    beam: int = 1, reverb: float = 0.0, init_weights: Optional[str] = None, **model_kwargs) -> dict:
    """Build the corpus (cached), train ``model_name`` from scratch, evaluate on held-out voices.

    sentences: the model's head is sized for the characters (CTC: blank + 28; seq2seq: padding + 28 + start/end)
    unless ``num_classes`` is given. ``beam``: beam width of the evaluation (seq2seq models; 1 = greedy; with a
    beam > 1 the greedy numbers are reported too). ``reverb``: probability of reverberating an utterance (training
    and test). ``init_weights``: start from these weights (e.g. a former run's ``save_weights``: training
    continued with a fresh learning-rate schedule) instead of a random initialisation."""
    import zoo

    if task not in TASKS:
        raise ValueError(f"run_speech_task: task must be one of {TASKS}, got {task!r}")
    check_fields("speech", argparse.Namespace(**locals()), LIMITS)
    for option, path in (("--output", output), ("--save-weights", save_weights)):
        if path:  # before the corpus and the training: a run is not thrown away because its results cannot be written
            check_output_file(path, option)
    torch.manual_seed(seed)
    corpus = build_corpus(task, Path(cache_dir) if cache_dir else None, n_strings=n_strings, seed=seed,
                          voices_per_split=voices_per_split, progress=progress)
    train_loader, test_loader = _loaders(task, corpus, batch_size, seed, reverb)
    model_name = model_name or {"kws": "mamba_kws_tiny", "digits": "mamba_ctc_causal_tiny", "sentences": "mamba_ctc_tiny"}[task]
    model = zoo.create_model(model_name, **model_kwargs)
    if task != "kws" and getattr(model, "head_type", None) not in ("ctc", "seq2seq"):
        raise ValueError(f"run_speech_task: task {task!r} needs a CTC or encoder-decoder entry, {model_name} has "
                         f"head {getattr(model, 'head_type', None)!r}")
    if beam > 1 and getattr(model, "head_type", None) != "seq2seq":
        raise ValueError(f"run_speech_task: beam search (beam={beam}) is for encoder-decoder entries (samba_asr_*); "
                         f"{model_name} decodes greedily")
    if task != "kws" and "num_classes" not in model_kwargs:
        symbols = 10 if task == "digits" else len(CHARS)
        needed = symbols + (1 if model.head_type == "ctc" else 2)
        if model.num_classes != needed:
            torch.manual_seed(seed)
            model = zoo.create_model(model_name, num_classes=needed, **model_kwargs)
    if init_weights:
        from zoo.hub import load_checkpoint, load_state_dict

        load_state_dict(model, load_checkpoint(init_weights), source=init_weights)
    if getattr(getattr(model, "frontend", None), "normalize", None) == "global" and not init_weights:
        # Streaming front ends normalise with fixed per-bin statistics: estimate them on (up to 512) training utterances.
        stats_loader = DataLoader(SynthSpeech(corpus, "train", train=False, seed=seed), batch_size, collate_fn=collate_waves)
        batches = itertools.islice(stats_loader, max(1, 512 // batch_size))
        model.frontend.fit_global_stats((waves, lengths) for waves, lengths, _ in batches)
    opt = torch.optim.AdamW(param_groups_weight_decay(model, 0.05), lr=lr)
    steps = epochs * (min(len(train_loader), limit_batches) if limit_batches else len(train_loader))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.15)
    t0, seen = time.time(), 0
    for epoch in range(epochs):
        model.train()
        bar = tqdm(train_loader, desc=f"{task} epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
        for i, (waves, lengths, labels) in enumerate(bar):
            if limit_batches and i >= limit_batches:
                break
            loss = _step_loss(task, model, waves, lengths, labels)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
            seen += len(labels)
            bar.set_postfix(loss=f"{loss.item():.3f}", utt_per_s=f"{seen / (time.time() - t0):.1f}")
    train_time = time.time() - t0
    t1 = time.time()
    metrics = evaluate(task, model, test_loader, examples=0 if task == "kws" else 5)
    metrics["eval_seconds"] = time.time() - t1
    if beam > 1:
        t1 = time.time()
        metrics["beam"] = dict(beam=beam, **evaluate(task, model, test_loader, beam=beam), eval_seconds=time.time() - t1)
    result = dict(command=command, task=task, model=model_name, init_weights=init_weights, epochs=epochs, train_utterances=len(train_loader.dataset),
                  test_utterances=len(test_loader.dataset), train_seconds=train_time, reverb=reverb,
                  params=sum(p.numel() for p in model.parameters()), **metrics)
    if output:
        write_text_atomic(output, json.dumps(result, indent=1))
    if save_weights:
        from zoo.hub import save_state_dict

        save_state_dict(model, save_weights)
    return result


def transcribe_file(path: str, model_name: str = "mamba_ctc_causal_tiny", checkpoint: Optional[str] = None,
                    stream: bool = False, chunk_ms: int = 100, beam: int = 1) -> dict:
    """Transcribe one audio file (any rate, mono or the mean of its channels) with a CTC model (greedy CTC over the
    whole waveform, or with ``stream`` chunk by chunk, ``chunk_ms`` of audio each, through ``StreamingTranscriber``
    (causal models), recording when each symbol came out; both give the same transcript) or an encoder-decoder
    model (samba_asr_*: greedy, or beam search with ``beam`` > 1). The head's size says what the symbols are:
    digits (10) or characters (28). ``checkpoint`` None: the shipped weights of ``model_name`` (a tag, or the arch's
    default tag: ``mamba_ctc_causal_tiny.digits``, ``samba_asr_tiny.sentences``; ``mamba_ctc_tiny.sentences`` by name)."""
    import soundfile as sf
    import torchaudio.functional as AF

    import zoo

    # Without a checkpoint: the entry's shipped weights (e.g. mamba_ctc_causal_tiny.digits); an entry without any is an error.
    kwargs = dict(checkpoint_path=checkpoint) if checkpoint else dict(pretrained=True)
    if checkpoint:
        # The head's size comes from the file (a sentence model has 29 or 30 classes, the entry's default may differ).
        from zoo.hub import load_checkpoint

        weights = load_checkpoint(checkpoint)
        head = weights.get("head.weight")
        if head is not None:
            kwargs["num_classes"] = head.shape[0]
        if model_name.startswith("samba_asr") and "ctc_head.weight" not in weights:
            kwargs["ctc_weight"] = 0.0  # trained without the auxiliary CTC head
    model = zoo.create_model(model_name, **kwargs).eval()
    head_type = getattr(model, "head_type", None)
    if head_type not in ("ctc", "seq2seq"):
        raise ValueError(f"transcribe: {model_name} has no CTC or decoder head (expected an entry such as "
                         f"mamba_ctc_causal_tiny or samba_asr_tiny)")
    if stream and head_type != "ctc":
        raise ValueError(f"transcribe: --stream needs a causal CTC model, {model_name} is an encoder-decoder model")
    task = vocab_task(model)
    try:
        wave, sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:
        raise ValueError(f"transcribe: could not read {path} as audio ({type(e).__name__}: {e})") from e
    wave = torch.from_numpy(wave).mean(1)
    rate = model.frontend.sample_rate
    wave = AF.resample(wave, sr, rate) if sr != rate else wave
    if wave.shape[0] < model.frontend.win:
        raise ValueError(f"transcribe: {path} is shorter than one 25 ms window ({wave.shape[0]} samples at {rate} Hz)")
    events = []
    if stream:
        if chunk_ms < 1:
            raise ValueError(f"transcribe: chunk_ms must be >= 1, got {chunk_ms}")
        transcriber = model.stream()
        size = max(1, rate * chunk_ms // 1000)
        for start in range(0, wave.shape[0], size):
            new = transcriber.accept(wave[start : start + size])
            if new:
                events.append(dict(audio_seconds=min(start + size, wave.shape[0]) / rate, text=tokens_text(task, new)))
        tokens = transcriber.tokens[0]
    else:
        with torch.no_grad():
            tokens = transcribe_batch(model, wave[None], None, beam)[0]
    return dict(file=path, model=model_name, checkpoint=checkpoint, seconds=wave.shape[0] / rate,
                text=tokens_text(task, tokens), stream=stream, chunk_ms=chunk_ms if stream else None, beam=beam,
                events=events)


def add_cli(subparsers) -> None:
    def limit(name: str):
        return number_arg(**LIMITS[name])

    p = subparsers.add_parser("speech", help="train/evaluate a Mamba speech encoder on speech synthesized here (espeak-ng)")
    p.add_argument("--task", choices=list(TASKS), default="kws", help="keyword spotting (accuracy), digit strings or "
                   "words / short sentences (CER, WER)")
    p.add_argument("--model", default=None, help="zoo entry (default: mamba_kws_tiny / mamba_ctc_causal_tiny / "
                   "mamba_ctc_tiny; samba_asr_tiny: encoder-decoder)")
    p.add_argument("--epochs", type=limit("epochs"), default=8)
    p.add_argument("--batch-size", type=limit("batch_size"), default=32)
    p.add_argument("--lr", type=limit("lr"), default=2e-3)
    p.add_argument("--seed", type=limit("seed"), default=0)
    p.add_argument("--cache-dir", default=None, help="where the corpus is built (default ~/.cache/mamba-zoo/speech)")
    p.add_argument("--voices-per-split", type=limit("voices_per_split"), default=None, help="use only this many voices per split (quick runs)")
    p.add_argument("--n-strings", type=limit("n_strings"), default=1200, help="digits / sentences: how many strings to "
                   "synthesize (train + test)")
    p.add_argument("--beam", type=limit("beam"), default=1, help="encoder-decoder models: also evaluate with beam search "
                   "of this width (1: greedy only)")
    p.add_argument("--reverb", type=number_arg(kind=float, low=0, high=1), default=0.0,
                   help="probability that an utterance is reverberated (synthetic room impulse response)")
    p.add_argument("--limit-batches", type=limit("limit_batches"), default=None, help="train on at most this many batches per epoch")
    p.add_argument("--output", default=None, help="write the result JSON here")
    p.add_argument("--save-weights", default=None, help="write the trained model's state dict here (safetensors)")
    p.add_argument("--init-weights", default=None, help="start from these weights (a former run's --save-weights: "
                   "training continues with a fresh learning-rate schedule)")
    p.set_defaults(func=_cli_main)
    # Speech enhancement: `zoo speech enhance-train | enhance-eval | enhance FILE` (zoo.tasks.speech_enhance).
    from zoo.tasks.speech_enhance import add_speech_subcommands

    sub = p.add_subparsers(dest="speech_command", metavar="{transcribe,enhance-train,enhance-eval,enhance}")
    t = sub.add_parser("transcribe", help="transcribe an audio file with a CTC or encoder-decoder model (--stream: chunk by chunk)")
    t.add_argument("file", help="audio file (wav, flac, ...; any rate, channels averaged)")
    t.add_argument("--model", default="mamba_ctc_causal_tiny", help="CTC entry or samba_asr_tiny")
    t.add_argument("--beam", type=number_arg(kind=int, low=1), default=1, help="encoder-decoder models: beam width (1: greedy)")
    t.add_argument("--checkpoint", default=None, help="trained weights, e.g. from zoo speech --task digits --save-weights "
                   "(default: the entry's shipped weights: mamba_ctc_causal_tiny.digits, samba_asr_tiny.sentences; "
                   "--model mamba_ctc_tiny.sentences)")
    t.add_argument("--stream", action="store_true", help="decode chunk by chunk with carried state (causal models), "
                   "printing digits as they come out")
    t.add_argument("--chunk-ms", type=number_arg(kind=int, low=1), default=100, help="chunk length with --stream")
    t.set_defaults(func=_cli_transcribe)
    add_speech_subcommands(sub)


def _cli_transcribe(args: argparse.Namespace) -> int:
    result = transcribe_file(args.file, args.model, args.checkpoint, args.stream, args.chunk_ms, args.beam)
    for event in result["events"]:
        print(f"[{event['audio_seconds']:7.2f} s] {event['text']}")
    print(result["text"])
    return 0


def _cli_main(args: argparse.Namespace) -> int:
    result = run_speech_task(args.task, args.model, args.epochs, args.batch_size, args.lr, args.seed, args.cache_dir,
                             args.output, args.voices_per_split, n_strings=args.n_strings, limit_batches=args.limit_batches,
                             command="zoo " + " ".join(sys.argv[1:]), save_weights=args.save_weights, beam=args.beam,
                             reverb=args.reverb, init_weights=args.init_weights)
    metric = f"accuracy {result['accuracy']:.4f}" if args.task == "kws" else f"CER {result['cer']:.4f}, WER {result['wer']:.4f}"
    if "beam" in result:
        metric += f" (beam {result['beam']['beam']}: CER {result['beam']['cer']:.4f}, WER {result['beam']['wer']:.4f})"
    print(f"{result['model']} on {args.task}: {metric} on {result['test_utterances']} held-out-voice utterances "
          f"({result['train_seconds']:.0f} s training, {result['params'] / 1e6:.2f}M params)")
    return 0
