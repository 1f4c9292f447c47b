"""Speech enhancement on the noisy espeak-ng corpus (zoo.data.speech_enhance): train, evaluate, enhance a file.

    zoo speech enhance-train --model mambattention_tiny --output result.json --save-weights model.safetensors
    zoo speech enhance-eval  --model mambattention_tiny --checkpoint model.safetensors --output eval.json
    zoo speech enhance NOISY.wav --model mambattention_tiny --checkpoint model.safetensors --out clean.wav

Metrics (maintained implementations): wide-band PESQ (ITU-T P.862.2, the ``pesq`` package), STOI (``pystoi``)
and SI-SDR (torchmetrics' ``scale_invariant_signal_distortion_ratio``), each for the enhanced output and for
the noisy input itself, per utterance of the test split (held-out voices, noise types and SNRs), averaged
overall, per noise type and per SNR. ``pip install "mamba-zoo[speech]"`` brings them.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from zoo.tasks.engine import (
    check_fields, check_output_file, number_arg, param_groups_weight_decay, resolve_device, write_text_atomic,
)

LIMITS = dict(
    epochs=dict(kind=int, low=1), batch_size=dict(kind=int, low=1), lr=dict(kind=float, low=0, low_open=True),
    seed=dict(kind=int, low=0), voices_per_split=dict(kind=int, low=1, optional=True), n_strings=dict(kind=int, low=10),
    limit_batches=dict(kind=int, low=1, optional=True), segment=dict(kind=float, low=0.1),
    max_seconds=dict(kind=float, low=0, low_open=True, optional=True), eval_limit=dict(kind=int, low=1, optional=True),
)
METRICS = ("pesq", "stoi", "si_sdr")


def _metric_modules():
    try:
        from pesq import pesq
        from pystoi import stoi
        from torchmetrics.functional.audio import scale_invariant_signal_distortion_ratio
    except ImportError as e:
        raise ImportError(f"speech enhancement metrics need the packages pesq, pystoi and torchmetrics "
                          f"(pip install \"mamba-zoo[speech]\"); missing: {e.name}") from e
    return pesq, stoi, scale_invariant_signal_distortion_ratio


def enhancement_metrics(clean: torch.Tensor, estimate: torch.Tensor, sample_rate: int = 16000) -> dict:
    """PESQ (wide band), STOI and SI-SDR (dB) of one estimate (samples,) against its clean reference.
    A PESQ the package cannot compute (no utterance detected) is NaN."""
    pesq, stoi, si_sdr = _metric_modules()
    ref, est = clean.detach().double().cpu(), estimate.detach().double().cpu()
    try:
        p = float(pesq(sample_rate, ref.numpy(), est.numpy(), "wb"))
    except Exception:  # pesq.NoUtteranceError and friends: a clip PESQ cannot score
        p = math.nan
    return dict(pesq=p, stoi=float(stoi(ref.numpy(), est.numpy(), sample_rate, extended=False)),
                si_sdr=float(si_sdr(est, ref)))


def _mean(rows, key):
    vals = [r[key] for r in rows if not math.isnan(r[key])]
    return sum(vals) / len(vals) if vals else math.nan


def _summary(rows):
    return {k: _mean(rows, k) for k in METRICS}


@torch.no_grad()
def evaluate_enhancement(model, dataset, device="cpu", limit: Optional[int] = None, progress: bool = False) -> dict:
    """Metrics of the model's output and of the noisy input on every item of ``dataset`` (one utterance at a
    time: no padding), overall and per noise type and SNR."""
    model.eval()
    rows = []
    n = min(len(dataset), limit) if limit else len(dataset)
    for i in tqdm(range(n), desc="enhancement eval", disable=not progress, leave=False):
        noisy, clean, info = dataset[i]
        enhanced = model(noisy[None].to(device)).float()[0].cpu()
        rows.append(dict(noise=info["noise"], snr=info["snr"], noisy=enhancement_metrics(clean, noisy),
                         enhanced=enhancement_metrics(clean, enhanced)))

    def block(sel):
        noisy, enh = _summary([r["noisy"] for r in sel]), _summary([r["enhanced"] for r in sel])
        return dict(utterances=len(sel), noisy=noisy, enhanced=enh, gain={k: enh[k] - noisy[k] for k in METRICS})

    groups = dict(noise=defaultdict(list), snr=defaultdict(list))
    for r in rows:
        groups["noise"][r["noise"]].append(r)
        groups["snr"][str(r["snr"])].append(r)
    out = block(rows)
    out["pesq_failures"] = sum(math.isnan(r["enhanced"]["pesq"]) for r in rows)
    out["by_noise"] = {k: block(v) for k, v in sorted(groups["noise"].items())}
    out["by_snr"] = {k: block(v) for k, v in sorted(groups["snr"].items(), key=lambda kv: float(kv[0]))}
    return out


def _corpus(cache_dir, n_strings, seed, voices_per_split, progress):
    from zoo.data.speech import build_corpus

    return build_corpus("digits", Path(cache_dir) if cache_dir else None, n_strings=n_strings, seed=seed,
                        voices_per_split=voices_per_split, progress=progress)


def _autocast(device, amp):
    if amp == "none":
        return None
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def run_enhance_train(model_name: str = "mambattention_tiny", epochs: int = 4, batch_size: int = 8, lr: float = 5e-4,
                      seed: int = 0, cache_dir: Optional[str] = None, n_strings: int = 1200,
                      voices_per_split: Optional[int] = None, segment: float = 1.0, limit_batches: Optional[int] = None,
                      max_seconds: Optional[float] = None, eval_limit: Optional[int] = None, device: str = "cpu",
                      amp: str = "none", output: Optional[str] = None, save_weights: Optional[str] = None,
                      command: Optional[str] = None, progress: bool = True, **model_kwargs) -> dict:
    """Train ``model_name`` from scratch on noisy training voices (train noise types and SNRs), then evaluate on
    the held-out voices with held-out noise types and SNRs. AdamW with the paper's betas (0.8, 0.99) and a
    learning rate decayed by 0.99 per epoch, as the official recipe; gradients clipped at norm 5."""
    import zoo
    from zoo.data.speech import SAMPLE_RATE
    from zoo.data.speech_enhance import NoisySpeech, collate_pairs, noise_summary
    from zoo.models.speech.mambattention import enhancement_loss

    check_fields("speech enhance-train", argparse.Namespace(**locals()), LIMITS)
    if amp not in ("none", "bf16", "fp16"):
        raise ValueError(f"run_enhance_train: amp must be none, bf16 or fp16, got {amp!r}")
    for option, path in (("--output", output), ("--save-weights", save_weights)):
        if path:
            check_output_file(path, option)
    _metric_modules()  # before training: a run is not thrown away because the metrics are not installed
    dev = resolve_device(device)
    torch.manual_seed(seed)
    corpus = _corpus(cache_dir, n_strings, seed, voices_per_split, progress)
    train = NoisySpeech(corpus, "train", train=True, seed=seed, segment=int(segment * SAMPLE_RATE))
    test = NoisySpeech(corpus, "test", train=False, seed=seed)
    loader = DataLoader(train, batch_size, shuffle=True, drop_last=len(train) >= batch_size, collate_fn=collate_pairs,
                        generator=torch.Generator().manual_seed(seed))
    model = zoo.create_model(model_name, **model_kwargs).to(dev)
    opt = torch.optim.AdamW(param_groups_weight_decay(model, 0.01), lr=lr, betas=(0.8, 0.99))
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.99)
    scaler = torch.amp.GradScaler(dev.type) if amp == "fp16" else None
    t0, steps, seen, last, stopped, history = time.time(), 0, 0, {}, False, []
    for epoch in range(epochs):
        model.train()
        bar = tqdm(loader, desc=f"enhance epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
        for i, (noisy, clean, _) in enumerate(bar):
            if limit_batches and i >= limit_batches:
                break
            if max_seconds and time.time() - t0 > max_seconds:
                stopped = True
                break
            loss, last = enhancement_loss(model, noisy.to(dev), clean.to(dev), _autocast(dev, amp))
            opt.zero_grad(set_to_none=True)
            if scaler:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
            else:
                loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            scaler.step(opt) if scaler else opt.step()
            if scaler:
                scaler.update()
            steps, seen = steps + 1, seen + noisy.shape[0]
            history.append(round(loss.item(), 4))
            bar.set_postfix(loss=f"{loss.item():.3f}")
        sched.step()
        if stopped:
            break
    train_seconds = time.time() - t0
    t1 = time.time()
    metrics = evaluate_enhancement(model, test, dev, eval_limit, progress)
    result = dict(command=command, task="speech enhancement", model=model_name, model_kwargs=model_kwargs,
                  params=sum(p.numel() for p in model.parameters()), epochs_run=epoch + 1, steps=steps,
                  train_clips=len(train), train_segment_seconds=segment, batch_size=batch_size, lr=lr, seed=seed,
                  device=str(dev), amp=amp, n_strings=n_strings, voices_per_split=voices_per_split,
                  stopped_by_time_limit=stopped, train_seconds=train_seconds, eval_seconds=time.time() - t1,
                  loss_history=history, last_loss_terms=last, test_split="held-out voices, held-out noise types and SNRs",
                  **noise_summary(), torch=torch.__version__, **metrics)
    if output:
        write_text_atomic(output, json.dumps(result, indent=1))
    if save_weights:
        from zoo.hub import save_state_dict

        save_state_dict(model, save_weights)
    return result


def _load(model_name, checkpoint, device):
    import zoo

    kwargs = dict(checkpoint_path=checkpoint) if checkpoint else {}
    return zoo.create_model(model_name, **kwargs).to(resolve_device(device)).eval()


def run_enhance_eval(model_name: str, checkpoint: Optional[str] = None, seed: int = 0, cache_dir: Optional[str] = None,
                     n_strings: int = 1200, voices_per_split: Optional[int] = None, eval_limit: Optional[int] = None,
                     device: str = "cpu", output: Optional[str] = None, command: Optional[str] = None,
                     progress: bool = True) -> dict:
    """Metrics of a (trained) model on the test split of the corpus that the same arguments build."""
    from zoo.data.speech_enhance import NoisySpeech, noise_summary

    if output:
        check_output_file(output)
    _metric_modules()
    torch.manual_seed(seed)  # without a checkpoint: the initialisation that enhance-train with this seed starts from
    model = _load(model_name, checkpoint, device)
    test = NoisySpeech(_corpus(cache_dir, n_strings, seed, voices_per_split, progress), "test", train=False, seed=seed)
    result = dict(command=command, task="speech enhancement", model=model_name, checkpoint=checkpoint, seed=seed,
                  n_strings=n_strings, voices_per_split=voices_per_split, **noise_summary(),
                  **evaluate_enhancement(model, test, next(model.parameters()).device, eval_limit, progress))
    if output:
        write_text_atomic(output, json.dumps(result, indent=1))
    return result


@torch.no_grad()
def enhance_file(path: str, out: str, model_name: str, checkpoint: Optional[str] = None, device: str = "cpu") -> dict:
    """Enhance one audio file (any rate, mono or the mean of its channels) into ``out`` at the input's rate."""
    import soundfile as sf
    import torchaudio.functional as AF

    model = _load(model_name, checkpoint, device)
    try:
        wave, sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:
        raise ValueError(f"enhance: could not read {path} as audio ({type(e).__name__}: {e})") from e
    wave = torch.from_numpy(wave).mean(1)
    rate = model.sample_rate
    x = AF.resample(wave, sr, rate) if sr != rate else wave
    y = model(x[None].to(next(model.parameters()).device))[0].float().cpu()
    y = AF.resample(y, rate, sr) if sr != rate else y
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    sf.write(out, y.numpy(), sr)
    return dict(input=path, output=out, sample_rate=sr, seconds=wave.shape[0] / sr, model=model_name, checkpoint=checkpoint)


# --------------------------------------------------------------------------------------------- CLI

def add_speech_subcommands(sub) -> None:
    """``zoo speech enhance-train | enhance-eval | enhance`` (sub: the subparsers of ``zoo speech``)."""
    def limit(name):
        return number_arg(**LIMITS[name])

    def corpus_args(p):
        p.add_argument("--seed", type=limit("seed"), default=0, help="corpus, noise and training seed")
        p.add_argument("--cache-dir", default=None, help="where the corpus is built (default ~/.cache/mamba-zoo/speech)")
        p.add_argument("--n-strings", type=limit("n_strings"), default=1200, help="digit strings to synthesize (train + test)")
        p.add_argument("--voices-per-split", type=limit("voices_per_split"), default=None, help="use only this many voices per split")
        p.add_argument("--eval-limit", type=limit("eval_limit"), default=None, help="evaluate on at most this many test clips")
        p.add_argument("--device", default="cpu")
        p.add_argument("--output", default=None, help="write the result JSON here")
        p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("enhance-train", help="train a speech enhancement model (MambAttention, Mamba baseline) on noisy "
                       "speech made here; evaluate PESQ / STOI / SI-SDR on held-out voices, noise types and SNRs")
    p.add_argument("--model", default="mambattention_tiny", help="zoo entry (mambattention*, mamba_se*)")
    p.add_argument("--epochs", type=limit("epochs"), default=4)
    p.add_argument("--batch-size", type=limit("batch_size"), default=8)
    p.add_argument("--lr", type=limit("lr"), default=5e-4)
    p.add_argument("--segment", type=limit("segment"), default=1.0, help="training crop length in seconds")
    p.add_argument("--limit-batches", type=limit("limit_batches"), default=None, help="at most this many batches per epoch")
    p.add_argument("--max-seconds", type=limit("max_seconds"), default=None, help="stop training after this many seconds")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none", help="autocast the network (CUDA)")
    p.add_argument("--save-weights", default=None, help="write the trained model's state dict here (safetensors)")
    corpus_args(p)
    p.set_defaults(func=_cli_train)

    p = sub.add_parser("enhance-eval", help="PESQ / STOI / SI-SDR of an enhancement model on the noisy test split")
    p.add_argument("--model", default="mambattention_tiny")
    p.add_argument("--checkpoint", default=None, help="weights (safetensors or torch file), e.g. from --save-weights")
    corpus_args(p)
    p.set_defaults(func=_cli_eval)

    p = sub.add_parser("enhance", help="enhance an audio file")
    p.add_argument("file", help="noisy audio file (wav, flac, ...)")
    p.add_argument("--model", default="mambattention_tiny")
    p.add_argument("--checkpoint", default=None, help="weights (safetensors or torch file)")
    p.add_argument("--out", required=True, help="where to write the enhanced audio")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_cli_enhance)


def _command(args):
    return getattr(args, "command_line", None) or "zoo " + " ".join(sys.argv[1:])


def _print(result):
    e, n = result["enhanced"], result["noisy"]
    print(f"{result['model']}: PESQ {e['pesq']:.3f} (noisy {n['pesq']:.3f}), STOI {e['stoi']:.3f} (noisy {n['stoi']:.3f}), "
          f"SI-SDR {e['si_sdr']:.2f} dB (noisy {n['si_sdr']:.2f} dB) on {result['utterances']} test clips")


def _cli_train(args) -> int:
    result = run_enhance_train(args.model, args.epochs, args.batch_size, args.lr, args.seed, args.cache_dir, args.n_strings,
                               args.voices_per_split, args.segment, args.limit_batches, args.max_seconds, args.eval_limit,
                               args.device, args.amp, args.output, args.save_weights, _command(args), not args.no_progress)
    _print(result)
    return 0


def _cli_eval(args) -> int:
    result = run_enhance_eval(args.model, args.checkpoint, args.seed, args.cache_dir, args.n_strings, args.voices_per_split,
                              args.eval_limit, args.device, args.output, _command(args), not args.no_progress)
    _print(result)
    return 0


def _cli_enhance(args) -> int:
    info = enhance_file(args.file, args.out, args.model, args.checkpoint, args.device)
    print(f"wrote {info['output']} ({info['seconds']:.2f} s at {info['sample_rate']} Hz)")
    return 0
