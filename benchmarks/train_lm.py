"""Train small byte-level LMs on the King James Bible: Mamba, Mamba-2 and a matched Transformer, the same way.

    # where the Debian packages are installed (apt-get install -y bible-kjv-text bible-kjv): the text as a file
    mkdir -p runs/kjv && bible -f gen1:1-rev22:21 > runs/kjv/kjv.txt      # runs/ is git-ignored
    # on the GPU machine (no network, no packages), with runs/kjv carried there
    python benchmarks/train_lm.py --data runs/kjv/kjv.txt --out OUT --max-minutes 3.5

The models (zoo.models.language.MambaLMHeadModel, vocabulary of the 256 byte values):

- ``mamba``: the entry ``mamba_tiny_lm`` (d_model 256, 8 Mamba-1 layers, d_state 16, expand 2);
- ``mamba2``: the entry ``mamba2_tiny_lm`` (d_model 256, 8 Mamba-2 layers, d_state 64, headdim 64);
- ``transformer``: the baseline, the same class with attention layers only (pre-norm: RMSNorm -> causal
  self-attention through scaled_dot_product_attention, 4 heads of 64 with rotary embedding on all 64 channels, no
  biases -> RMSNorm -> SwiGLU MLP of 768) at the same width; each of its 4 layers has two residual sublayers, so it
  has the Mamba models' 8 and about their parameter count (3.48M against 3.57M and 3.52M). Embedding, final norm,
  tied head, float32 residual stream and initialisation are the same code as the Mamba models'.

Training, identical for the three: the same random windows of ``--seq-len`` bytes (one seeded generator per model,
so the same batches in the same order), AdamW (betas 0.9 / 0.95, weight decay on matrices and the embedding, not on
norms, biases and the SSM's A_log / D / dt_bias), linear warm-up then cosine decay to 10 %, gradient clipping at 1,
bf16 autocast on CUDA. ``--max-minutes`` bounds the whole run: a few timed steps of each model (after warm-up steps
that absorb the Triton compilation) give the number of steps that fits, the same for every model (never more than
``--steps``); the models then start again from their seeded initialisation.

Evaluation: held-out books (zoo.data.kjv: test Joshua, Proverbs, Romans, Revelation; validation Ruth, Ecclesiastes,
Jonah, Galatians), every byte scored once at the training length and at ``--eval-lengths`` (default: 1x and 2x), as
nats, perplexity per byte and bits per byte (zoo.tasks.language_modeling.evaluate_lm).

``--out`` gets ``result.json`` (settings, corpus, per model: parameters, steps, tokens, losses, validation curve,
test perplexity and bits/byte, tokens/s, wall time, a greedy sample; the git commit and the command) and per model
``<name>/model.safetensors`` (float32, the tied lm_head left out) + ``<name>/config.json`` (mamba-ssm's config),
which ``zoo.models.language.from_pretrained(folder)`` reads, and which ``zoo pretrained package
OUT/mamba/model.safetensors mamba_tiny_lm.kjv`` turns into a shipped tag's file. result.json is rewritten after each
model, so a run cut short keeps what finished.

``--tiny`` (for tests and CPU): d_model 32, 2 Mamba layers (1 Transformer layer), 3 steps of 2 x 32 bytes.

``python benchmarks/train_lm.py ship RUN_DIR`` packages a finished run's Mamba weights as the tags
``mamba_tiny_lm.kjv`` / ``mamba2_tiny_lm.kjv`` (see :func:`ship`) and prints the lines that register them.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

from zoo.data.kjv import kjv_splits  # noqa: E402
from zoo.hub import save_state_dict, write_text_atomic  # noqa: E402
from zoo.models.language import MambaLMHeadModel, model_config  # noqa: E402
from zoo.tasks.engine import number_arg  # noqa: E402
from zoo.tasks.language_modeling import evaluate_lm, lm_loss, random_windows  # noqa: E402

MODELS = ("mamba", "mamba2", "transformer")
ENTRIES = {"mamba": "mamba_tiny_lm", "mamba2": "mamba2_tiny_lm"}  # the registered entries; the baseline is not one
SAMPLE_PROMPT = "And it came to pass"


def transformer_config(d_model: int, n_layer: int) -> dict:
    """The matched Transformer of a Mamba LM of ``n_layer`` layers: n_layer // 2 layers of attention + SwiGLU MLP
    (heads of 64 channels, rotary on all of them, MLP 3 x d_model, no biases), as MambaLMHeadModel arguments."""
    heads = max(1, d_model // 64)
    layers = max(1, n_layer // 2)
    return dict(d_model=d_model, n_layer=layers, d_intermediate=3 * d_model, vocab_size=256,
                attn_layer_idx=list(range(layers)),
                attn_cfg=dict(num_heads=heads, causal=True, rotary_emb_dim=d_model // heads, qkv_proj_bias=False,
                              out_proj_bias=False))


def model_kwargs(name: str, tiny: bool) -> dict:
    """MambaLMHeadModel arguments of each model (the entries' configs; --tiny shrinks them alike)."""
    if name == "transformer":
        return transformer_config(32, 2) if tiny else transformer_config(256, 8)
    cfg = model_config(ENTRIES[name])
    if tiny:
        cfg.update(d_model=32, n_layer=2)
        if cfg["ssm_cfg"]["layer"] == "Mamba2":
            cfg["ssm_cfg"].update(headdim=16, d_state=16, chunk_size=16)
    return cfg


def build(name: str, tiny: bool, seed: int, device) -> MambaLMHeadModel:
    torch.manual_seed(seed)
    return MambaLMHeadModel(**model_kwargs(name, tiny)).to(device)


def param_groups(model, weight_decay: float):
    skip = model.no_weight_decay()
    decay, rest = [], []
    for n, p in model.named_parameters():
        (decay if p.dim() >= 2 and n not in skip else rest).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def lr_at(step: int, total: int, warmup: int, peak: float, floor: float = 0.1) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from ``peak`` to ``floor * peak`` at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


class Trainer:
    """One model's optimizer and step; ``step()`` trains on the next batch of its own seeded window stream."""

    def __init__(self, model, args, train: torch.Tensor, device: torch.device, total_steps: int):
        self.model, self.args, self.train, self.device = model, args, train, device
        self.total = total_steps
        self.warmup = max(1, int(args.warmup * total_steps))
        fused = device.type == "cuda"
        self.opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95),
                                     fused=fused)
        self.gen = torch.Generator().manual_seed(args.seed)
        self.amp = torch.bfloat16 if args.amp == "bf16" and device.type == "cuda" else None
        self.n = 0

    def step(self) -> torch.Tensor:
        x, y = random_windows(self.train, self.args.seq_len, self.args.batch_size, self.gen)
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.n, self.total, self.warmup, self.args.lr)
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            logits = self.model(x)
        loss = lm_loss(logits, y, self.model.vocab_size)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.n += 1
        return loss.detach()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def calibrate(names, args, splits, device):
    """Seconds per training step of each model, after warm-up steps (compilation, autotuning, allocator); and the
    errors of models that could not train (left out of the run, their error recorded)."""
    times, errors = {}, {}
    for name in names:
        try:
            model = build(name, args.tiny, args.seed, device)
            trainer = Trainer(model, args, splits.train, device, total_steps=1000)
            start = time.perf_counter()
            for _ in range(args.calib_warmup):
                trainer.step()
            # The evaluations' shapes and dtypes too (Triton compiles per dtype and shape class), so that their
            # compilation is spent here, inside the measured time, not after the budget was split.
            evaluate_lm(model, splits.val, args.seq_len, args.eval_batch_size, device, trainer.amp,
                        max_windows=args.val_windows)
            for length in args.eval_lengths:
                end = min(splits.test.numel(), args.eval_batch_size * length + length // 3 + 2)
                evaluate_lm(model, splits.test[:end], length, args.eval_batch_size, device)
            sync(device)
            warm = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(args.calib_steps):
                trainer.step()
            sync(device)
        except Exception as e:
            import traceback

            errors[name] = {"entry": ENTRIES.get(name), "error": f"calibration: {type(e).__name__}: {e}",
                            "traceback": traceback.format_exc()}
            print(f"calibrate {name} FAILED: {errors[name]['error']}", flush=True)
            continue
        finally:
            model = trainer = None
        times[name] = (time.perf_counter() - start) / args.calib_steps
        print(f"calibrate {name}: {times[name] * 1e3:.1f} ms/step ({args.batch_size * args.seq_len / times[name]:,.0f} "
              f"tokens/s; {warm:.1f} s for the {args.calib_warmup} warm-up steps and the evaluations' first "
              f"windows)", flush=True)
    return times, errors


def eval_batches(stream_len: int, length: int, batch: int) -> int:
    return math.ceil(math.ceil((stream_len - 1) / length) / batch)


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                               text=True, timeout=10)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def save_model(model: MambaLMHeadModel, folder: Path) -> None:
    """model.safetensors (tied lm_head left out: checkpoint_filter_fn restores it) + mamba-ssm's config.json."""
    sd = {k: v for k, v in model.state_dict().items() if not (k == "lm_head.weight" and model.tie_embeddings)}
    save_state_dict(sd, folder / "model.safetensors")
    config = {**model.config_dict(), "tie_embeddings": model.tie_embeddings}
    write_text_atomic(folder / "config.json", json.dumps(config, indent=1) + "\n")


def train_one(name: str, args, splits, device: torch.device, steps: int, out: Path) -> dict:
    """Train one model for ``steps`` steps, evaluate it on the held-out books, save it; its result entry."""
    if device.type == "cuda":  # the peak memory of this model's training alone
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = build(name, args.tiny, args.seed, device)
    params = sum(p.numel() for p in model.parameters())
    print(f"\n== {name}{' (' + ENTRIES[name] + ')' if name in ENTRIES else ''}: {params:,} parameters, {steps} steps "
          f"of {args.batch_size} x {args.seq_len} bytes", flush=True)
    trainer = Trainer(model, args, splits.train, device, steps)
    curve, losses = [], []
    sync(device)
    t_train = time.perf_counter()
    eval_time = 0.0
    for i in range(steps):
        losses.append(trainer.step())
        if (i + 1) % args.eval_every == 0 or i + 1 == steps:
            t_eval = time.perf_counter()
            train_loss = float(torch.stack(losses[-args.eval_every:]).mean())
            if not math.isfinite(train_loss):
                raise FloatingPointError(f"training loss is {train_loss} at step {i + 1}")
            val = evaluate_lm(model, splits.val, args.seq_len, args.eval_batch_size, device, trainer.amp,
                              max_windows=args.val_windows)
            eval_time += time.perf_counter() - t_eval
            elapsed = time.perf_counter() - t_train - eval_time
            curve.append({"step": i + 1, "train_loss": round(train_loss, 4), "val_nll": round(val["nll"], 4),
                          "val_bpb": round(val["bpb"], 4)})
            print(f"{name} step {i + 1}/{steps}: train loss {train_loss:.4f}, val {val['nll']:.4f} nats "
                  f"({val['bpb']:.3f} bits/byte), lr {trainer.opt.param_groups[0]['lr']:.2e}, "
                  f"{(i + 1) * args.batch_size * args.seq_len / elapsed:,.0f} tokens/s, {elapsed:.0f} s", flush=True)
    sync(device)
    train_s = time.perf_counter() - t_train - eval_time
    tokens = steps * args.batch_size * args.seq_len
    entry = {
        "entry": ENTRIES.get(name), "config": model_kwargs(name, args.tiny), "params": params, "steps": steps,
        "tokens": tokens, "epochs": round(tokens / splits.train.numel(), 2),
        "final_train_loss": curve[-1]["train_loss"], "curve": curve,
        "train_seconds": round(train_s, 2), "train_tokens_per_s": round(tokens / train_s),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None,
    }
    # The reported numbers in float32 (no autocast), as `zoo pretrained eval` measures the shipped weights.
    t_eval = time.perf_counter()
    entry["val"] = evaluate_lm(model, splits.val, args.seq_len, args.eval_batch_size, device)
    entry["test"] = {}
    for length in args.eval_lengths:
        r = evaluate_lm(model, splits.test, length, args.eval_batch_size, device)
        entry["test"][str(length)] = r
        print(f"{name} test at {length} bytes: {r['nll']:.4f} nats/byte, perplexity {r['ppl']:.3f}, "
              f"{r['bpb']:.4f} bits/byte ({r['bytes']:,} bytes)", flush=True)
    entry["eval_seconds"] = round(time.perf_counter() - t_eval, 2)
    save_model(model, out / name)
    entry["weights"] = str(out / name / "model.safetensors")
    if args.sample_bytes:
        try:
            ids = model.eval().generate(list(SAMPLE_PROMPT.encode()), max_new_tokens=args.sample_bytes, top_k=1)
            entry["sample"] = {"prompt": SAMPLE_PROMPT, "greedy": bytes(ids).decode("utf-8", errors="replace")}
            print(f"{name} sample: {SAMPLE_PROMPT}{entry['sample']['greedy'][:200]!r}", flush=True)
        except Exception as e:  # a sample is a courtesy: its failure must not lose the run
            entry["sample"] = {"error": f"{type(e).__name__}: {e}"}
            print(f"{name} sample failed: {entry['sample']['error']}", flush=True)
    return entry


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    pos = number_arg(int, 1)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=None, help="the KJV as a text file of `bible -f gen1:1-rev22:21` lines (default: run "
                   "the installed `bible` program of the Debian packages bible-kjv-text and bible-kjv)")
    p.add_argument("--out", required=True, help="folder for result.json and the weights")
    p.add_argument("--overwrite", action="store_true", help="write into an --out that already holds a result.json")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS, help="which models to train")
    p.add_argument("--seq-len", type=pos, default=512, help="training length in bytes")
    p.add_argument("--batch-size", type=pos, default=64)
    p.add_argument("--steps", type=pos, default=2000, help="training steps per model (at most: see --max-minutes)")
    p.add_argument("--max-minutes", type=number_arg(float, 0, low_open=True), default=None,
                   help="time budget of the whole run; fewer steps (the same for every model) when --steps would not fit")
    p.add_argument("--lr", type=number_arg(float, 0, low_open=True), default=2e-3, help="peak learning rate")
    p.add_argument("--weight-decay", type=number_arg(float, 0), default=0.1)
    p.add_argument("--warmup", type=number_arg(float, 0, 1, high_open=True), default=0.05, help="warm-up fraction")
    p.add_argument("--eval-every", type=pos, default=250, help="validation estimate every N steps")
    p.add_argument("--val-windows", type=pos, default=32, help="windows of the validation estimate during training")
    p.add_argument("--eval-lengths", type=pos, nargs="+", default=None,
                   help="test lengths in bytes (default: seq-len and 2 x seq-len)")
    p.add_argument("--eval-batch-size", type=pos, default=32)
    p.add_argument("--sample-bytes", type=number_arg(int, 0), default=300, help="greedy sample length (0: none)")
    p.add_argument("--calib-warmup", type=pos, default=5)
    p.add_argument("--calib-steps", type=pos, default=10)
    p.add_argument("--amp", choices=["bf16", "none"], default="bf16", help="autocast on CUDA (CPU: float32)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--seed", type=number_arg(int, 0), default=0)
    p.add_argument("--threads", type=pos, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--git-commit", default=None, help="the commit to record where the checkout has no .git (a copy of "
                   "the working tree, as on the GPU machine); default: git rev-parse HEAD")
    p.add_argument("--tiny", action="store_true", help="tiny models and run, for tests: d_model 32, 2 layers, 3 steps "
                   "of 2 x 32 bytes")
    args = p.parse_args(argv)
    if args.tiny:
        for k, v in dict(seq_len=32, batch_size=2, steps=3, eval_every=2, val_windows=2, eval_batch_size=8,
                         sample_bytes=8, calib_warmup=1, calib_steps=1).items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    args.eval_lengths = args.eval_lengths or [args.seq_len, 2 * args.seq_len]
    return args


def main(argv: Optional[List[str]] = None) -> dict:
    t0 = time.perf_counter()
    command = "python benchmarks/train_lm.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    out = Path(args.out)
    if out.is_file():
        raise SystemExit(f"train_lm: --out {out} is a file; expected a folder")
    if (out / "result.json").exists() and not args.overwrite:
        raise SystemExit(f"train_lm: {out / 'result.json'} exists (an earlier run); give --overwrite or another --out")
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"train_lm: --device {args.device} but CUDA is not available")
    names = [m for m in MODELS if m in args.models]

    splits = kjv_splits(args.data)
    corpus = splits.summary()
    print(f"corpus: {corpus['source']}: train {corpus['train_bytes']:,} bytes ({corpus['train_books']} books), val "
          f"{corpus['val_bytes']:,} ({', '.join(corpus['val_books'])}), test {corpus['test_bytes']:,} "
          f"({', '.join(corpus['test_books'])})", flush=True)
    for length in args.eval_lengths:
        if splits.test.numel() < length + 1:
            raise SystemExit(f"train_lm: the test books ({splits.test.numel()} bytes) are shorter than one eval window of "
                             f"{length} bytes")

    steps, calib, failed_calibration = args.steps, None, {}
    if args.max_minutes is not None:
        calib, failed_calibration = calibrate(names, args, splits, device)
        names = [n for n in names if n in calib]
        if not names:
            raise SystemExit("train_lm: no model could take a training step: "
                             + "; ".join(f"{n}: {e['error']}" for n, e in failed_calibration.items()))
        per_step = sum(calib.values())
        # Evaluation: test at every length, the validation estimates; a forward costs about a third of a step.
        eval_steps = sum(eval_batches(splits.test.numel(), n, args.eval_batch_size) * n / args.seq_len
                         * args.eval_batch_size / args.batch_size for n in args.eval_lengths)
        left = args.max_minutes * 60 - (time.perf_counter() - t0)
        reserve = len(names) * 10.0 + per_step * eval_steps  # saving, samples, model set-up; the test evaluation
        fit = int((left - reserve) / (per_step * (1 + args.val_windows / args.batch_size / args.eval_every / 3)))
        if fit < 1:
            raise SystemExit(f"train_lm: --max-minutes {args.max_minutes} leaves no time to train ({left:.0f} s left "
                             f"after calibration, {reserve:.0f} s kept for evaluation and saving)")
        steps = min(args.steps, fit)
        print(f"budget: {left:.0f} s left, {per_step:.3f} s per step of all models -> {steps} steps per model"
              f"{' (--steps)' if steps == args.steps else ''}", flush=True)

    settings = {k: v for k, v in vars(args).items() if k not in ("out", "overwrite", "git_commit")}
    result = {
        "command": command, "git_commit": args.git_commit or git_commit(), "settings": {**settings, "steps_run": steps},
        "corpus": corpus, "tokenizer": "bytes (UTF-8, vocabulary 256)",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "autocast": "bfloat16" if args.amp == "bf16" and device.type == "cuda" else None, "eval_precision": "float32",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "calibration_s_per_step": calib,
        "models": dict(failed_calibration),
    }

    failed = list(failed_calibration)
    for name in names:
        t_model = time.perf_counter()
        try:
            entry = train_one(name, args, splits, device, steps, out)
        except Exception as e:  # one model's failure must not lose the others' results
            import traceback

            entry = {"entry": ENTRIES.get(name), "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            failed.append(name)
            print(f"{name} FAILED: {entry['error']}", flush=True)
        entry["wall_seconds"] = round(time.perf_counter() - t_model, 2)
        result["models"][name] = entry
        result["wall_seconds"] = round(time.perf_counter() - t0, 2)
        write_text_atomic(out / "result.json", json.dumps(result, indent=1) + "\n")

    print(f"\n{'model':<12} {'params':>10} {'test ppl':>9} {'bits/byte':>9}  (at {args.eval_lengths[0]} bytes)")
    for name, e in result["models"].items():
        if "error" in e:
            print(f"{name:<12} failed: {e['error']}")
            continue
        r = e["test"][str(args.eval_lengths[0])]
        print(f"{name:<12} {e['params']:>10,} {r['ppl']:>9.4f} {r['bpb']:>9.4f}")
    print(f"wall time {result['wall_seconds']:.0f} s; wrote {out / 'result.json'}", flush=True)
    if failed:
        raise SystemExit(f"train_lm: {', '.join(failed)} failed (result.json holds the tracebacks)")
    return result


# --- shipping the trained Mamba LMs as tags --------------------------------------------------------------

TASK = "byte-level language modelling (benchmarks/train_lm.py)"
DATA = ("King James Bible (Debian package bible-kjv-text, read with its `bible` program; public domain), UTF-8 bytes; "
        "whole books held out: test Joshua, Proverbs, Romans, Revelation; validation Ruth, Ecclesiastes, Jonah, "
        "Galatians; the other 58 books for training")


def ship(run_dir, tag: str = "kjv", results_name: str = "train_lm_kjv.json", root: Path = REPO) -> List[str]:
    """Turn a finished run into shipped tags' files: for each Mamba entry the run trained, the float16 package file
    ``zoo/weights/<entry>.<tag>.safetensors`` (zoo pretrained package) and the recipe
    ``configs/pretrained/<entry>.<tag>.yaml``; the run's result.json copied, unchanged, to benchmarks/results/
    (all under ``root``, the repository). Prints the lines that register the tags and what is left to do. Returns
    the tags."""
    import shutil

    import yaml

    from zoo.hub import file_sha256
    from zoo.tasks.pretrained import package_weights

    run_dir = Path(run_dir)
    if not (run_dir / "result.json").is_file():
        raise SystemExit(f"train_lm ship: {run_dir / 'result.json'} not found; expected the --out folder of a run")
    result = json.loads((run_dir / "result.json").read_text())
    train_result = Path("benchmarks") / "results" / results_name
    weights_dir, recipes = Path(root) / "zoo" / "weights", Path(root) / "configs" / "pretrained"
    (Path(root) / train_result).parent.mkdir(parents=True, exist_ok=True)
    recipes.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir / "result.json", Path(root) / train_result)
    settings, tags, lines = result["settings"], [], []
    for name, entry_name in ENTRIES.items():
        entry = result["models"].get(name)
        if entry is None or "error" in entry:
            print(f"{name}: not shipped ({'not trained in this run' if entry is None else entry['error']})")
            continue
        if entry["config"] != model_config(entry_name):
            raise SystemExit(f"train_lm ship: {name} was trained with another configuration than {entry_name}'s "
                             f"(--tiny?): {entry['config']}")
        full = f"{entry_name}.{tag}"
        weights = run_dir / name / "model.safetensors"
        dst = package_weights(weights, full, out_dir=weights_dir)
        recipe = {
            "name": full, "task": TASK, "data": DATA, "model_kwargs": None,
            "training": (f"AdamW (lr {settings['lr']}, betas 0.9 / 0.95, weight decay {settings['weight_decay']}), "
                         f"linear warm-up over {settings['warmup']:.0%} of the steps then cosine to 10 %, gradient "
                         f"clipping 1, {entry['steps']} steps of {settings['batch_size']} x {settings['seq_len']} bytes "
                         f"({entry['tokens']:,} tokens, {entry['epochs']} epochs), "
                         f"{'bf16 autocast, ' if result['autocast'] else 'float32, '}seed {settings['seed']}, on "
                         f"{result['device']}; the run trained {', '.join(result['models'])} the same way"),
            "train": result["command"], "train_result": train_result.as_posix(), "weights": weights.as_posix(),
            "package": f"zoo pretrained package {weights.as_posix()} {full}",
            "evaluate": f"zoo pretrained eval {full} --output benchmarks/results/pretrained_{full}.json",
        }
        (recipes / f"{full}.yaml").write_text(f"# Recipe of the shipped tag {full}: written by "
                                              f"`python benchmarks/train_lm.py ship {run_dir.as_posix()}`.\n"
                                              + yaml.safe_dump(recipe, sort_keys=False, width=120))
        tags.append(full)
        lines.append(f'    "{full}": _byte_cfg("{entry_name}", file="weights/{full}.safetensors",\n'
                     f'        sha256="{file_sha256(dst)}"),')
    print(f"\ncopied {run_dir / 'result.json'} -> {train_result}; wrote the recipes configs/pretrained/<tag>.yaml")
    print("\nLeft to do by hand:\n1. zoo/models/language/mamba_lm.py: register the tags instead of the tag-less cfgs "
          "(they become the entries' default tags):\n\nregister_pretrained_cfgs({\n" + "\n".join(lines) + "\n})\n")
    print("2. zoo/tasks/pretrained.py, SHIPPED: " + ", ".join(f'"{t}": _eval_kjv' for t in tags))
    print("3. " + "; ".join(f"zoo pretrained eval {t} --output benchmarks/results/pretrained_{t}.json" for t in tags))
    print("4. model_cards/src/mamba_lm.md: " + ", ".join(f"{{{{shipped {t}}}}}" for t in tags)
          + " and the measured numbers; then python -m zoo.cards")
    print("5. tests/test_pretrained_tags.py caps the shipped files at 10 MB in all; these add "
          f"{sum((weights_dir / f'{t}.safetensors').stat().st_size for t in tags) / 1e6:.1f} MB")
    return tags


if __name__ == "__main__":
    if sys.argv[1:2] == ["ship"]:
        if len(sys.argv) != 3:
            raise SystemExit("usage: python benchmarks/train_lm.py ship RUN_DIR (the --out folder of a finished run)")
        ship(sys.argv[2])
    else:
        main()
