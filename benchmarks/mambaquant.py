"""Post-training quantization drop per zoo entry on its embedded task (zoo.research.mambaquant:
fake-quant simulation, every nn.Linear quantized, per-tensor static activation scales).

Entries, quantized with calibration on 4 training batches:
  vim (vision)     tiny Vim on digits 16x16 (benchmarks/token_dynamics.py's baseline model), trained here first, top-1
  mambamil (MIL)   MambaMIL (SR-Mamba mixers) on digit bags (zoo.tasks.mil), trained here first, accuracy and AUC
  <tag>            each tag shipped with the package (vim_tiny.digits, pointmamba_tiny.shapes3d, mambamil.digit_bags,
                   smamba_classifier.basicmotions, mamba_kws_tiny.kws, mamba_ctc_causal_tiny.digits,
                   mamba_tiny_lm.kjv, mamba2_tiny_lm.kjv, mamba_ctc_tiny.sentences, samba_asr_tiny.sentences) as
                   published, on its recorded test split

    PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/mambaquant.py --out benchmarks/results/mambaquant.json
"""
from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from token_dynamics import MODEL_KWARGS, accuracy, digits_loaders, train_digits_vim
from zoo.research.mambaquant import quantize_model

SETTINGS = [("float", None, None), ("per_channel", 8, 8), ("hadamard", 8, 8), ("mambaquant", 8, 8),
            ("per_channel", 4, 8), ("hadamard", 4, 8), ("mambaquant", 4, 8),
            ("per_channel", 4, 4), ("hadamard", 4, 4), ("mambaquant", 4, 4)]


def vision_entry(epochs: int, seed: int):
    model = train_digits_vim({}, epochs, seed)
    train_loader, test_loader = digits_loaders(32, seed)
    calib = [x for x, _ in list(train_loader)[:4]]
    return model, calib, lambda m: {"accuracy": accuracy(m, test_loader)}, dict(model="vim_tiny", **MODEL_KWARGS)


def mil_entry(epochs: int, seed: int):
    from zoo.data.digit_bags import make_digit_bags
    from zoo.tasks.mil import build_bench_model, evaluate_mil, train_mil

    tr_x, tr_y = make_digit_bags(300, "train", bag_size=(8, 48), seed=seed)
    te_x, te_y = make_digit_bags(300, "test", bag_size=(8, 48), seed=seed)
    torch.manual_seed(seed)
    model = build_bench_model("mambamil", tr_x[0].shape[1], 2, 64, 5, 0.25)
    train_mil(model, tr_x, tr_y, epochs, 1e-3, 1e-5, 8, seed)
    calib = [(tr_x[i : i + 8],) for i in range(0, 32, 8)]
    return model, calib, lambda m: evaluate_mil(m, te_x, te_y), dict(model="mambamil", embed_dim=64, rate=5)


def shipped_entry(tag: str):
    """A tag trained here and shipped with the package (no training): its recorded test split
    (zoo.tasks.pretrained), calibration on 4 batches of its training split."""
    def build(epochs: int, seed: int):
        import zoo
        from zoo.tasks import pretrained

        model = zoo.create_model(tag, pretrained=True).eval()
        calib, evaluate = _SHIPPED_DATA[tag](model, seed)
        if evaluate is None:
            def evaluate(m):
                out = pretrained.SHIPPED[tag](m)
                return {out["metric"]: out[out["metric"]]}
        return model, calib, evaluate, dict(model=tag, pretrained=True)
    return build


def _calib_digits(model, seed):
    from torch.utils.data import DataLoader

    from zoo.data import create_dataset

    cfg = model.pretrained_cfg
    train = create_dataset("digits", "train", img_size=cfg["input_size"][-1], mean=cfg["mean"], std=cfg["std"], seed=0)
    return [x for x, _ in list(DataLoader(train, batch_size=32, shuffle=True,
                                          generator=torch.Generator().manual_seed(seed)))[:4]], None


def _calib_shapes3d(model, seed):
    from zoo.data.shapes3d import make_shapes3d

    x, _ = make_shapes3d(8, 512, seed=seed)  # training-split seeds; the test split uses seed 2000
    return [x[i : i + 10] for i in range(0, 40, 10)], None


def _calib_digit_bags(model, seed):
    from zoo.data.digit_bags import make_digit_bags

    bags, _ = make_digit_bags(32, "train", bag_size=(8, 48), seed=seed)
    return [(bags[i : i + 8],) for i in range(0, 32, 8)], None


def _calib_basicmotions(model, seed):
    from zoo.data.timeseries import load_classification_set

    X, _, _ = load_classification_set("BasicMotions", "train")
    X = torch.as_tensor(X)[torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))]
    return [X[i : i + 10] for i in range(0, 40, 10)], None


def _calib_speech(task: str, n_strings: int):
    """Calibration and evaluation of a speech tag on its recipe corpus (seed 0, ``n_strings`` strings), built once
    here (the shipped evaluation rebuilds it on every call); greedy decoding as in the shipped evaluation. An
    encoder-decoder (Samba) calibrates its decoder on the teacher-forced transcripts, its inputs in training."""
    def calib(model, seed):
        from zoo.data.speech import build_corpus
        from zoo.tasks.speech import _loaders, evaluate, label_tokens

        corpus = build_corpus(task, None, n_strings=n_strings, seed=0, progress=False)
        train_loader, test_loader = _loaders(task, corpus, 32, seed)
        batches = []
        for (waves, lengths, labels), _ in zip(train_loader, range(4)):
            if hasattr(model, "make_targets"):
                batches.append((waves, lengths, model.make_targets([label_tokens(task, t) for t in labels])[0]))
            else:
                batches.append((waves, lengths))
        metric = "accuracy" if task == "kws" else "cer"
        return batches, lambda m: {metric: evaluate(task, m, test_loader)[metric]}
    return calib


def _calib_kjv(model, seed):
    import os

    from zoo.data.kjv import kjv_splits
    from zoo.tasks.pretrained import KJV_EVAL_LENGTH

    # 4 batches of 8 windows of the training length drawn from the training books.
    train = kjv_splits(os.environ.get("ZOO_KJV_TEXT") or None).train
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, train.numel() - KJV_EVAL_LENGTH, (32,), generator=g)
    windows = train[starts[:, None] + torch.arange(KJV_EVAL_LENGTH)].long()
    return [windows[i : i + 8] for i in range(0, 32, 8)], None


_SHIPPED_DATA = {"vim_tiny.digits": _calib_digits, "pointmamba_tiny.shapes3d": _calib_shapes3d,
                 "mambamil.digit_bags": _calib_digit_bags, "smamba_classifier.basicmotions": _calib_basicmotions,
                 "mamba_kws_tiny.kws": _calib_speech("kws", 1200),  # `zoo speech` defaults
                 "mamba_ctc_causal_tiny.digits": _calib_speech("digits", 3000),
                 "mamba_tiny_lm.kjv": _calib_kjv, "mamba2_tiny_lm.kjv": _calib_kjv,
                 "mamba_ctc_tiny.sentences": _calib_speech("sentences", 3000),
                 "samba_asr_tiny.sentences": _calib_speech("sentences", 3000)}

ENTRIES = {"vim": vision_entry, "mambamil": mil_entry, **{tag: shipped_entry(tag) for tag in _SHIPPED_DATA}}
EPOCHS = {"vim": 6, "mambamil": 10}  # the token-dynamics benchmark's and zoo.tasks.mil's schedules


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--entries", nargs="+", default=["vim", "mambamil"], choices=list(ENTRIES),
                   help="vim, mambamil: trained here first; the dotted names: the shipped tags as published")
    p.add_argument("--epochs", type=int, default=None, help=f"training epochs before quantization (default: {EPOCHS})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows, results = [], []
    for entry in args.entries:
        start = time.perf_counter()
        epochs = args.epochs or EPOCHS.get(entry, 0)
        model, calib, evaluate, config = ENTRIES[entry](epochs, args.seed)
        base = evaluate(model)
        for method, w_bits, a_bits in SETTINGS:
            q = model if method == "float" else quantize_model(copy.deepcopy(model), calib, method, w_bits, a_bits)
            metrics = base if method == "float" else evaluate(q)
            label = "float" if method == "float" else f"W{w_bits}A{a_bits} {method}"
            res = dict(entry=entry, setting=label, **metrics,
                       drop={k: round(100 * (base[k] - v), 2) for k, v in metrics.items()})
            print(json.dumps(res), flush=True)
            results.append(res)
            rows.append(f"| {entry} | {label} | " + ", ".join(f"{k} {100 * v:.2f}" for k, v in metrics.items()) + " | "
                        + ", ".join(f"{v:+.2f}" for v in res["drop"].values()) + " |")
        results.append(dict(entry=entry, config=config, epochs=epochs, seconds=round(time.perf_counter() - start, 1)))
    table = "\n".join(["| entry | setting | test metric (%) | drop vs float (points) |", "|---|---|---|---|", *rows])
    print(table)
    if args.out:
        Path(args.out).write_text(json.dumps(dict(
            command="PYTHONPATH=. python benchmarks/mambaquant.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
            note="fake-quant simulation; weights per output channel, activations per tensor (static, calibrated on 4 "
                 "training batches); every nn.Linear quantized, dt_proj weight-only; scan, convs and norms in float",
            seed=args.seed, threads=torch.get_num_threads(), torch=torch.__version__,
            results=results, table=table), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
