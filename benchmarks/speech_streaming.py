"""Streaming ASR latency on CPU: the causal CTC entry (``mamba_ctc_causal_tiny``) fed chunk by chunk through
``StreamingTranscriber`` (``model.stream()``), against the full pass on the same utterances.

    OMP_NUM_THREADS=1 python benchmarks/speech_streaming.py [--checkpoint W | --untrained] \
        [--chunk-ms 10 40 100 200 400] [--utterances 40] [--threads 1] [--out benchmarks/results/speech_streaming_cpu.json]

Audio: the first ``--utterances`` held-out-voice test utterances of the digits corpus (zoo.data.speech, built and
cached on first use; espeak-ng). Each chunk size runs over every utterance in a fresh stream; reported per chunk
size: the compute time of one ``accept`` call (median, 90th percentile, max, over every call), the real-time
factor (compute / audio duration), the algorithmic latency (the chunk plus the 15 ms a 25 ms window reaches past a
10 ms hop; encoder frames are emitted as soon as their 4th feature frame is complete, nothing waits for
look-ahead), whether the streamed transcripts equal the full pass's (they must), the largest difference of the
log-probabilities from the full pass (float32 rounding), and the CER of the streamed transcripts. Weights: the
shipped tag (``mamba_ctc_causal_tiny.digits``), or ``--checkpoint``; ``--untrained`` times a random model (the CER
is then meaningless and left out). The first utterance of each chunk size is a warm-up and is not timed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
from torchaudio.functional import edit_distance

import zoo
from zoo.data.speech import SynthSpeech, build_corpus
from zoo.models.speech.mamba_asr import ctc_greedy_decode


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mamba_ctc_causal_tiny")
    p.add_argument("--checkpoint", default=None, help="trained weights (default: the entry's shipped weights)")
    p.add_argument("--untrained", action="store_true", help="a randomly initialised model (timings only)")
    p.add_argument("--chunk-ms", type=int, nargs="+", default=[10, 40, 100, 200, 400])
    p.add_argument("--utterances", type=int, default=40)
    p.add_argument("--n-strings", type=int, default=1200, help="the digits corpus to take test utterances from")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.untrained:
        model = zoo.create_model(args.model)
    elif args.checkpoint:
        model = zoo.create_model(args.model, checkpoint_path=args.checkpoint)
    else:
        model = zoo.create_model(args.model, pretrained=True)
    model.eval()
    test = SynthSpeech(build_corpus("digits", n_strings=args.n_strings, progress=False), "test")
    items = [test[i] for i in range(min(args.utterances + 1, len(test)))]  # +1: the warm-up utterance
    sr = model.frontend.sample_rate

    full_times, full = [], []
    for i, (wave, _) in enumerate(items):
        t0 = time.perf_counter()
        with torch.no_grad():
            log_probs, frames = model(wave[None])
        if i:
            full_times.append(time.perf_counter() - t0)
        full.append((log_probs[0], ctc_greedy_decode(log_probs, frames)[0]))
    audio_s = sum(w.numel() for w, _ in items[1:]) / sr

    rows = []
    for ms in args.chunk_ms:
        size = sr * ms // 1000
        calls, max_diff, same, errors, chars = [], 0.0, True, 0, 0
        for i, (wave, label) in enumerate(items):
            stream = model.stream(keep_log_probs=True)
            for piece in torch.split(wave, size):
                t0 = time.perf_counter()
                stream.accept(piece)
                if i:
                    calls.append(time.perf_counter() - t0)
            max_diff = max(max_diff, float((stream.log_probs[0] - full[i][0]).abs().max()))
            same &= stream.tokens[0] == full[i][1]
            if i:
                errors += edit_distance("".join(str(t - 1) for t in stream.tokens[0]), label)
                chars += len(label)
        calls.sort()
        row = dict(chunk_ms=ms, chunk_samples=size, calls=len(calls),
                   compute_ms_median=1e3 * statistics.median(calls),
                   compute_ms_p90=1e3 * calls[int(0.9 * (len(calls) - 1))], compute_ms_max=1e3 * calls[-1],
                   real_time_factor=sum(calls) / audio_s, algorithmic_latency_ms=ms + 15,
                   transcripts_equal_full_pass=same, max_abs_log_prob_diff=max_diff)
        if not args.untrained:
            row["cer_streamed"] = errors / chars
        rows.append(row)
        print(f"{ms:4d} ms chunks: compute median {row['compute_ms_median']:.2f} ms, p90 {row['compute_ms_p90']:.2f} ms, "
              f"RTF {row['real_time_factor']:.3f}, transcripts equal to the full pass: {same}, max |dlogp| {max_diff:.1e}")

    result = dict(
        command="OMP_NUM_THREADS=%s python benchmarks/speech_streaming.py %s" % (
            os.environ.get("OMP_NUM_THREADS", "unset"), " ".join(sys.argv[1:] if argv is None else argv)),
        model=args.model, weights="untrained" if args.untrained else args.checkpoint or model.pretrained_cfg.get("file"),
        threads=args.threads, utterances=len(items) - 1,
        audio_seconds=audio_s, full_pass_ms_per_utterance_median=1e3 * statistics.median(full_times),
        full_pass_real_time_factor=sum(full_times) / audio_s, chunks=rows,
        machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        note="shared 2-core machine (another engineer's jobs on the other core); times are wall-clock per accept() call",
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
