"""Long context on an LM: passkey retrieval and perplexity at 1x, 2x, 4x, 8x, 16x the training length, for the plain
model and each training-free method of zoo.research.long_context (LongMamba; Stuffed Mamba's forget-more, state
normalisation and sliding window), over several seeds; writes OUT.json, OUT.md (a table) and OUT.png (accuracy and perplexity against
length). MemMamba is an architecture, not a training-free method: a MemMamba LM (trained with
zoo.research.memmamba.apply_memmamba) is measured by passing its checkpoint with --memmamba CFG_JSON.

The model: a zoo entry name (--pretrained for its official weights, --checkpoint FILE for a weights file,
--model-kwargs for its size, e.g. a tiny random model) or a save_pretrained folder. The text: any UTF-8 file; it
gives the perplexity windows, the passkey prompts' filler and the calibration samples (taken at the training length,
from a seed of their own). Tokens: UTF-8 bytes (--tokenizer bytes, the default for vocabularies up to 512) or a
tokenizer.json / hf-hub spec (default for larger vocabularies: GPT-NeoX's, as the Mamba checkpoints).

Passkey: filler text with "The pass key is NNNNN. Remember it. NNNNN is the pass key." at a uniformly random depth,
then "What is the pass key? The pass key is NNNNN"; a prompt counts as retrieved when every token of the answer is
the model's top prediction (teacher forcing), the whole prompt being the length measured. Perplexity: exp of the mean
next-token loss over whole windows of the length ("ppl"), and over their last training-length tokens ("ppl_last").
Capacity (Stuffed Mamba): the longest length whose passkey accuracy (mean over seeds) is >= --capacity-accuracy.

    # a byte-level LM of our own (benchmarks/train_lm.py writes RUN/mamba/{model.safetensors,config.json}), trained
    # at 512 bytes, on the held-out Bible books (kjv:test needs bible-kjv-text; elsewhere pass them as a file):
    PYTHONPATH=. python benchmarks/long_context.py --model RUN/mamba --text kjv:test --train-length 512 \\
        --device cuda --out benchmarks/results/long_context_kjv_mamba
    # an official checkpoint (GPT-NeoX tokenizer from the Hugging Face cache), trained at 2048 tokens:
    PYTHONPATH=. python benchmarks/long_context.py --model mamba_130m --pretrained --text data.txt \\
        --train-length 2048 --device cuda --out benchmarks/results/long_context_mamba_130m
    # the CPU smoke run of the tests: a tiny random model
    PYTHONPATH=. python benchmarks/long_context.py --model mamba_130m --model-kwargs d_model=16 n_layer=2 \\
        vocab_size=256 --text README.md --train-length 32 --seeds 0 1 --out /tmp/lc
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from zoo.research import long_context as lc

METHODS = ("plain", "longmamba", "forget_more_remember_less", "state_normalization", "sliding_window")


def passkey_prompt(filler: torch.Tensor, length: int, key: str, depth: float, encode):
    """(ids (length,), answer positions): the needle at ``depth`` of ``filler`` ids, the question and the answer last."""
    needle = encode(f" The pass key is {key}. Remember it. {key} is the pass key. ")
    question = encode(" What is the pass key? The pass key is")
    answer = encode(f" {key}")
    room = length - needle.numel() - question.numel() - answer.numel()
    if room < 0:
        raise ValueError(f"passkey: length {length} is shorter than the needle, question and answer "
                         f"({length - room} tokens)")
    if filler.numel() < room:
        raise ValueError(f"passkey: the text gives {filler.numel()} filler tokens, {room} needed")
    at = int(round(depth * room))
    ids = torch.cat([filler[:at], needle, filler[at:room], question, answer])
    return ids, torch.arange(length - answer.numel(), length)


def passkey_room(length: int, digits: int, encode) -> int:
    """Filler tokens a prompt of ``length`` holds (negative: too short for the needle, question and answer)."""
    key = "0" * digits
    fixed = encode(f" The pass key is {key}. Remember it. {key} is the pass key. ").numel() \
        + encode(" What is the pass key? The pass key is").numel() + encode(f" {key}").numel()
    return length - fixed


@torch.no_grad()
def passkey_accuracy(model, ids: torch.Tensor, length: int, samples: int, seed: int, encode, digits: int, device):
    """(share of prompts retrieved, share of answer tokens right) over ``samples`` prompts of ``length``."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + length)
    ok, tokens_ok, tokens = 0, 0, 0
    for _ in range(samples):
        key = "".join(str(int(d)) for d in torch.randint(0, 10, (digits,), generator=gen))
        depth = float(torch.rand((), generator=gen))
        start = int(torch.randint(0, max(1, ids.numel() - length), (), generator=gen))
        prompt, answer_at = passkey_prompt(ids[start:], length, key, depth, encode)
        prompt = prompt.to(device)
        logits = model(prompt[None])[0]
        predicted = logits[answer_at - 1].argmax(-1)
        right = predicted == prompt[answer_at]
        ok += int(right.all())
        tokens_ok += int(right.sum())
        tokens += right.numel()
    return ok / samples, tokens_ok / tokens


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, length: int, windows: int, seed: int, train_length: int, device):
    """(ppl over whole windows, ppl over their last train_length tokens)."""
    batch = lc.sample_windows(ids, length, windows, seed=seed * 1_000_003 + length).to(device)
    total, total_last, n, n_last = 0.0, 0.0, 0, 0
    for row in batch:
        logits = model(row[None])[0, :-1].float()
        loss = F.cross_entropy(logits, row[1:], reduction="none")
        total += float(loss.sum())
        n += loss.numel()
        last = loss[-min(train_length, loss.numel()):]
        total_last += float(last.sum())
        n_last += last.numel()
    return math.exp(total / n), math.exp(total_last / n_last)


def prepare(model, method: str, args, ids: torch.Tensor, encode, device) -> dict:
    """Install ``method`` on ``model`` (in place); returns the method's settings for the record."""
    lc.remove_long_context(model)
    if method == "plain":
        return {}
    calib = lc.sample_windows(ids, args.train_length, args.calib_samples, seed=args.calib_seed).to(device)
    if method == "longmamba":
        if args.calibration:
            cal = lc.load_calibration(args.calibration)
        else:
            lengths = sorted({int(m * args.train_length) for m in args.multipliers if m > 1}) or [2 * args.train_length]
            cal = lc.calibrate_longmamba(model, calib, lengths, criterion=args.longmamba_criterion, mamba1_rate=args.mamba1_rate)
        lc.apply_longmamba(model, cal, channel_threshold=args.channel_threshold)
        share = [round(float((layer["decay"] > args.channel_threshold).float().mean()), 4) for layer in cal["layers"]]
        return dict(channel_threshold=args.channel_threshold, criterion=cal["criterion"], calibrated_lengths=cal["lengths"],
                    mamba1_rate=cal.get("mamba1_rate"),
                    global_share_per_layer=share, calibration=args.calibration)
    if method == "forget_more_remember_less":
        lc.apply_stuffed_mamba(model, method, dt_scale=args.dt_scale, A_scale=args.A_scale, B_scale=args.B_scale)
        return dict(dt_scale=args.dt_scale, A_scale=args.A_scale, B_scale=args.B_scale)
    if method == "state_normalization":
        cal = lc.calibrate_state_norm(model, calib)
        lc.apply_stuffed_mamba(model, method, calibration=cal, threshold_multiplier=args.norm_multiplier, chunk=args.norm_chunk)
        return dict(threshold_multiplier=args.norm_multiplier, chunk=args.norm_chunk)
    if method == "sliding_window":
        window = args.window or args.train_length
        lc.apply_stuffed_mamba(model, method, window=window)
        return dict(window=window)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def read_text(spec: str) -> str:
    """A UTF-8 file, or ``kjv:test`` / ``kjv:val``: the held-out books of the King James Bible as zoo.data.kjv splits
    them for the byte-level LMs trained here (read from the Debian package bible-kjv-text)."""
    if spec in ("kjv:test", "kjv:val"):
        from zoo.data import kjv

        books = kjv.load_kjv()
        held = kjv.TEST_BOOKS if spec == "kjv:test" else kjv.VAL_BOOKS
        return "".join(books[b] for b in books if b in set(held))
    return Path(spec).read_text(encoding="utf-8")


def summarise(rows: list, methods: list, lengths: list) -> dict:
    out = {}
    for m in methods:
        out[m] = {}
        for n in lengths:
            sel = [r for r in rows if r["method"] == m and r["length"] == n]
            entry = {}
            for key in ("ppl", "ppl_last", "passkey", "passkey_tokens"):
                got = [r[key] for r in sel if r[key] is not None]
                vals = torch.tensor(got, dtype=torch.float64)
                entry[key] = float(vals.mean()) if got else None
                entry[key + "_std"] = (float(vals.std(unbiased=False)) if len(got) > 1 else 0.0) if got else None
            out[m][n] = entry
    return out


def table(summary: dict, lengths: list, multipliers: list) -> str:
    head = "| method | " + " | ".join(f"{m:g}x ({n}) ppl / passkey %" for m, n in zip(multipliers, lengths)) + " |"
    lines = [head, "|---|" + "---|" * len(lengths)]
    for method, per in summary.items():
        cells = [f"{per[n]['ppl']:.3g} / " + ("-" if per[n]["passkey"] is None else
                                              f"{100 * per[n]['passkey']:.0f} (±{100 * per[n]['passkey_std']:.0f})")
                 for n in lengths]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: dict, lengths: list, train_length: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for method, per in summary.items():
        have = [n for n in lengths if per[n]["passkey"] is not None]
        a.errorbar(have, [100 * per[n]["passkey"] for n in have], yerr=[100 * per[n]["passkey_std"] for n in have],
                   marker="o", capsize=3, label=method)
        b.errorbar(lengths, [per[n]["ppl"] for n in lengths], yerr=[per[n]["ppl_std"] for n in lengths], marker="o",
                   capsize=3, label=method)
    for ax, ylabel in ((a, "passkey retrieval (%)"), (b, "perplexity (whole window)")):
        ax.set_xscale("log", base=2)
        ax.axvline(train_length, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("length (tokens); dotted: training length")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    b.set_yscale("log")
    a.set_ylim(-5, 105)
    a.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="zoo LM entry name or a save_pretrained folder")
    p.add_argument("--checkpoint", default=None, help="weights file for the entry")
    p.add_argument("--pretrained", action="store_true", help="the entry's official weights")
    p.add_argument("--model-kwargs", nargs="*", default=[], help="key=value (JSON values) for create_model")
    p.add_argument("--memmamba", default=None, help="JSON of apply_memmamba's arguments: wrap before loading --checkpoint")
    p.add_argument("--text", required=True, help="UTF-8 text file, or kjv:test / kjv:val (the held-out Bible books)")
    p.add_argument("--tokenizer", default=None, help="'bytes', a tokenizer.json, or an hf-hub spec")
    p.add_argument("--train-length", type=int, required=True, help="the model's training length in tokens")
    p.add_argument("--multipliers", type=float, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--passkey-samples", type=int, default=20, help="prompts per length and seed")
    p.add_argument("--passkey-digits", type=int, default=5)
    p.add_argument("--ppl-windows", type=int, default=4, help="windows per length and seed")
    p.add_argument("--calib-samples", type=int, default=8, help="calibration windows at the training length")
    p.add_argument("--calib-seed", type=int, default=12345)
    p.add_argument("--calibration", default=None, help="a LongMamba calibration file (python -m zoo.research.long_context calibrate)")
    p.add_argument("--channel-threshold", type=float, default=0.05, help="LongMamba: global channels have decay above this")
    p.add_argument("--longmamba-criterion", choices=("decay", "count"), default="decay")
    p.add_argument("--mamba1-rate", choices=("max", "mean", "min"), default="max", help="LongMamba: a Mamba-1 channel's rate")
    p.add_argument("--dt-scale", type=float, default=1.0, help="forget-more: Delta multiplier")
    p.add_argument("--A-scale", type=float, default=1.5, help="forget-more: decay-rate multiplier (> 1 forgets more)")
    p.add_argument("--B-scale", type=float, default=1.0, help="forget-more: input multiplier (< 1 remembers less)")
    p.add_argument("--norm-multiplier", type=float, default=1.0, help="state normalisation: threshold = calibrated norm x this")
    p.add_argument("--norm-chunk", type=int, default=128)
    p.add_argument("--window", type=int, default=None, help="sliding window: tokens the state keeps (default: the training length)")
    p.add_argument("--capacity-accuracy", type=float, default=0.9)
    p.add_argument("--diagnose", action="store_true", help="also record the plain model's state statistics at the longest length")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float64"))
    p.add_argument("--out", required=True, help="output stem: OUT.json, OUT.md, OUT.png")
    args = p.parse_args(argv)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    kwargs = lc.parse_kwargs(args.model_kwargs)
    if args.memmamba:
        from zoo.research.memmamba import apply_memmamba

        model = lc.load_lm(args.model, None, args.pretrained, kwargs)
        apply_memmamba(model, **json.loads(args.memmamba))
        if args.checkpoint:
            from zoo import hub

            hub.load_state_dict(model, hub.load_checkpoint(args.checkpoint), strict=True, source=args.checkpoint)
        model = model.to(device=device, dtype=dtype).eval()
        methods = ["plain"]  # the hooks and the memory's own scan hook are not combined here
    else:
        model = lc.load_lm(args.model, args.checkpoint, args.pretrained, kwargs, device=device, dtype=dtype)
        methods = list(args.methods)
    tok = lc.load_tokenizer_for(args.tokenizer, model)

    def encode(text):
        return lc.encode_text(text, tok)

    ids = encode(read_text(args.text))
    lengths = [int(round(m * args.train_length)) for m in args.multipliers]
    need = max(lengths)
    if ids.numel() < need + 1:  # a short text is repeated to reach the longest window
        ids = ids.repeat(math.ceil((need + 1) / ids.numel()))
    passkey_min = need - passkey_room(need, args.passkey_digits, encode)  # the needle, question and answer
    rows, settings = [], {}
    start = time.perf_counter()
    for method in methods:
        settings[method] = prepare(model, method, args, ids, encode, device)
        for n in lengths:
            for seed in args.seeds:
                ppl, ppl_last = perplexity(model, ids, n, args.ppl_windows, seed, args.train_length, device)
                acc = tok_acc = None  # a length too short for the needle has no passkey figure
                if n >= passkey_min:
                    acc, tok_acc = passkey_accuracy(model, ids, n, args.passkey_samples, seed, encode, args.passkey_digits, device)
                row = dict(method=method, length=n, multiplier=n / args.train_length, seed=seed, ppl=ppl, ppl_last=ppl_last,
                           passkey=acc, passkey_tokens=tok_acc)
                rows.append(row)
                print(json.dumps(row), flush=True)
    lc.remove_long_context(model)
    label = "memmamba" if args.memmamba else None
    summary = summarise(rows, methods, lengths)
    if label:
        summary = {label: summary["plain"]}
        for r in rows:
            r["method"] = label
    capacity = {m: lc.state_capacity({n: per[n]["passkey"] for n in lengths if per[n]["passkey"] is not None},
                                     args.capacity_accuracy) for m, per in summary.items()}
    result = dict(
        command="PYTHONPATH=. python benchmarks/long_context.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        model=args.model, params=sum(q.numel() for q in model.parameters()), state_size=lc.state_size(model),
        train_length=args.train_length, lengths=lengths, seeds=args.seeds, device=str(device), dtype=args.dtype,
        torch=torch.__version__, seconds=round(time.perf_counter() - start, 1), settings=settings,
        capacity=dict(min_accuracy=args.capacity_accuracy, longest_length=capacity), summary=summary, rows=rows)
    if args.diagnose and not args.memmamba:
        window = lc.sample_windows(ids, max(lengths), 1, seed=7).to(device)
        stats = lc.state_statistics(model, window, every=max(1, args.train_length // 4))
        result["state_collapse"] = lc.collapse_summary(stats, args.train_length)
    md = table(summary, lengths, args.multipliers)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(str(out) + ".json").write_text(json.dumps(result, indent=1) + "\n")
    caption = (f"{args.model}: training length {args.train_length}, seeds {args.seeds}, {args.passkey_samples} passkey prompts "
               f"and {args.ppl_windows} perplexity windows per length and seed (mean ± std over seeds). "
               f"Passkey capacity (accuracy >= {args.capacity_accuracy}): {capacity}. Command: `{result['command']}`")
    Path(str(out) + ".md").write_text(md + "\n\n" + caption + "\n")
    plot(summary, lengths, args.train_length, Path(str(out) + ".png"), f"{args.model} (train length {args.train_length})")
    print(md)
    print(f"wrote {out}.json, {out}.md, {out}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
