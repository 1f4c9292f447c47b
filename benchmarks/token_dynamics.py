"""Do the token-dynamics refinements (Vo et al., ICLR 2025) help? Models trained from scratch on an
embedded task in several variants, same seeds and data order per seed:

  baseline         plain mixers (S_C, S_B free: the scenario is whatever training makes it)
  convergent       bc_sign='negative': S_C^T S_B negative semi-definite, the scenario the paper says hurts
  mixed            bc_sign='mixed': half of the eigenvalues negative (the authors' "real" WikiText-103 run)
  positive         bc_sign='positive': refinement 1, the convergent scenario excluded
  reorder          reorder_tokens: refinement 2, tokens scanned by importance score
  reorder-soft     the same with SoftSort's soft permutation in the forward, as the authors' released code
  positive+reorder both refinements

Tasks (``--task``):

  digits  tiny Vim on the embedded digits (16x16, 4x4 patches: 16 tokens + class token; depth 2, width 48
          unless --depth / --share-layers), test accuracy on its 360 test images. The paper's evidence for
          reordering is image classification (MambaVision on ImageNet).
  recall  associative recall, the language-model setting of the paper's eigenvalue runs (WikiText-103) on a
          generated task: ``n_pairs`` (key, value) tokens with distinct keys, then a query key; a causal Mamba
          stack (zoo.research.memmamba.MemMambaModel without memory: embedding, residual RMSNorm + Mamba
          blocks, head on the last token) names the value. Accuracy on a fixed set of ``test_size``
          sequences, the same for every run. Token reordering is not defined here: it would let the query
          see the tokens after it in a causal model.

Writes a JSON with every run (test accuracy, the final scenario count) and prints a markdown table with
the mean and spread over seeds and, per variant, the seed-paired difference to the baseline. Runs go to
``--jobs`` worker processes (one thread each on CPU; with --device cuda they share the GPU):

    PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/token_dynamics.py --epochs 6 --seeds 0 1 2 \\
        --out benchmarks/results/token_dynamics_digits.json
    PYTHONPATH=. python benchmarks/token_dynamics.py --task recall --device cuda --jobs 8 --seeds 0 1 2 3 \\
        --variants baseline convergent mixed positive --out $OUT/token_dynamics_recall.json
    python benchmarks/token_dynamics.py --tabulate A.json B.json   # one table of runs saved apart
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import zoo
from zoo.data import create_dataset
from zoo.research.memmamba import MemMambaModel
from zoo.research.token_dynamics import enable_refinements, token_dynamics_report

VARIANTS = {
    "baseline": dict(),
    "convergent": dict(bc_sign="negative"),
    "mixed": dict(bc_sign="mixed"),
    "positive": dict(bc_sign="positive"),
    "reorder": dict(reorder_tokens=True),
    "reorder-soft": dict(reorder_tokens="soft"),
    "positive+reorder": dict(bc_sign="positive", reorder_tokens=True),
}
MODEL_KWARGS = dict(img_size=16, patch_size=4, stride=4, depth=2, embed_dim=48, num_classes=10, drop_path_rate=0.0)
RECALL = dict(n_pairs=16, n_keys=64, n_values=64, d_model=64, depth=4, d_state=16, steps=2000, batch_size=128,
              lr=1e-3, test_size=4096, D_init=1.0)
RECALL_TEST_SEED = 10_000  # the test sequences do not depend on the run's seed


def digits_loaders(batch_size: int, seed: int):
    train = create_dataset("digits", "train", img_size=MODEL_KWARGS["img_size"], seed=0)
    test = create_dataset("digits", "test", img_size=MODEL_KWARGS["img_size"], seed=0)
    return (DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(seed)),
            DataLoader(test, batch_size=256))


@torch.no_grad()
def accuracy(model, loader, device="cpu") -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += (model(x.to(device)).argmax(-1).cpu() == y).sum().item()
        total += y.numel()
    return correct / total


def train_digits_vim(refinements: dict, epochs: int, seed: int, lr: float = 2e-3, batch_size: int = 64,
                     share_layers: bool = False, device="cpu", model_kwargs: dict = MODEL_KWARGS):
    """A tiny Vim (``model_kwargs``) with the given refinements, AdamW + one-cycle schedule; returns the model.
    ``share_layers``: one block applied ``depth`` times, the paper's setting (its token dynamics are an ODE
    over depth with the same parameters at every layer; the residual stream is the Euler step)."""
    torch.manual_seed(seed)
    model = zoo.create_model("vim_tiny", **model_kwargs)
    if share_layers:
        for i in range(1, len(model.layers)):
            model.layers[i] = model.layers[0]
    model = enable_refinements(model.to(device), **refinements)
    train_loader, _ = digits_loaders(batch_size, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * len(train_loader), pct_start=0.1)
    for _ in range(epochs):
        model.train()
        for x, y in train_loader:
            loss = F.cross_entropy(model(x.to(device)), y.to(device), label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
    return model


def recall_batch(batch: int, n_pairs: int, n_keys: int, n_values: int, gen: torch.Generator):
    """(tokens (batch, 2 n_pairs + 1), labels (batch,)): k_1 v_1 ... k_n v_n q with distinct keys (ids
    [0, n_keys)), values (ids n_keys + [0, n_values)) drawn with replacement, and the query q one of the
    keys; the label is the value paired with q, in [0, n_values)."""
    if not 1 <= n_pairs <= n_keys:
        raise ValueError(f"recall_batch: n_pairs must be in [1, n_keys={n_keys}], got {n_pairs}")
    keys = torch.rand(batch, n_keys, generator=gen).argsort(dim=1)[:, :n_pairs]
    values = torch.randint(0, n_values, (batch, n_pairs), generator=gen)
    asked = torch.randint(0, n_pairs, (batch,), generator=gen)
    rows = torch.arange(batch)
    tokens = torch.stack([keys, values + n_keys], dim=2).flatten(1)
    tokens = torch.cat([tokens, keys[rows, asked, None]], dim=1)
    return tokens, values[rows, asked]


@torch.no_grad()
def recall_accuracy(model, tokens, labels, batch_size: int = 1024) -> float:
    model.eval()
    correct = sum((model(t).argmax(-1) == y).sum().item() for t, y in zip(tokens.split(batch_size), labels.split(batch_size)))
    return correct / labels.numel()


def build_recall_model(refinements: dict, cfg: dict = RECALL, device="cpu") -> MemMambaModel:
    """The causal Mamba stack of ``cfg`` with the given refinements, its skips D set to ``cfg["D_init"]``."""
    model = MemMambaModel(cfg["n_keys"] + cfg["n_values"], cfg["n_values"], memory=False, d_model=cfg["d_model"],
                          depth=cfg["depth"], d_state=cfg["d_state"])
    with torch.no_grad():  # the skip D x_t, to which the self-term (C_t . B_t) Delta_t x_t of y_t adds or cancels
        for layer in model.layers:
            layer.D.fill_(cfg["D_init"])
    return enable_refinements(model.to(device), **refinements)


def train_recall_mamba(refinements: dict, seed: int, cfg: dict = RECALL, device="cpu"):
    """A causal Mamba stack (``cfg``) with the given refinements trained on fresh recall batches (AdamW,
    one-cycle schedule); returns (model, loss of the last 50 steps)."""
    torch.manual_seed(seed)
    model = build_recall_model(refinements, cfg, device)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"], total_steps=cfg["steps"], pct_start=0.1)
    losses = []
    model.train()
    for _ in range(cfg["steps"]):
        tokens, labels = recall_batch(cfg["batch_size"], cfg["n_pairs"], cfg["n_keys"], cfg["n_values"], gen)
        loss = F.cross_entropy(model(tokens.to(device)), labels.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return model, statistics.mean(losses[-50:])


def run_one(task: str, variant: str, seed: int, cfg: dict, device: str) -> dict:
    """Train and test one (variant, seed); the scenario count is read from the trained parameters."""
    start = time.perf_counter()
    refinements = VARIANTS[variant]
    run = dict(variant=variant, seed=seed)
    if task == "digits":
        model = train_digits_vim(refinements, cfg["epochs"], seed, share_layers=cfg["share_layers"], device=device,
                                 model_kwargs=cfg["model_kwargs"])
        run["accuracy"] = accuracy(model, digits_loaders(64, 0)[1], device)
    else:
        model, run["final_train_loss"] = train_recall_mamba(refinements, seed, cfg, device)
        tokens, labels = recall_batch(cfg["test_size"], cfg["n_pairs"], cfg["n_keys"], cfg["n_values"],
                                      torch.Generator().manual_seed(RECALL_TEST_SEED))
        run["accuracy"] = recall_accuracy(model, tokens.to(device), labels.to(device))
    scenarios = [r.scenario for r in token_dynamics_report(model)]
    run.update(divergent=scenarios.count("divergent"), convergent=scenarios.count("convergent"),
               params=sum(q.numel() for q in model.parameters()), seconds=round(time.perf_counter() - start, 1))
    return run


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def summary_table(runs, variants) -> str:
    """Mean ± std over seeds, the per-seed values, and the seed-paired difference to the baseline
    (mean, standard deviation, Student t = mean / (std / sqrt(n)), and in how many seeds the variant is higher)."""
    base = {r["seed"]: r["accuracy"] for r in runs if r["variant"] == "baseline"}
    rows = ["| variant | test accuracy (mean ± std over seeds) | per seed | minus baseline, paired (mean ± std, t, higher in) "
            "| directions divergent / convergent after training |", "|---|---|---|---|---|"]
    for variant in variants:
        mine = [r for r in runs if r["variant"] == variant]
        accs = [r["accuracy"] for r in mine]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        diffs = [100 * (r["accuracy"] - base[r["seed"]]) for r in mine if r["seed"] in base]
        if variant == "baseline" or len(diffs) < 2:
            paired = "-"
        else:
            d_std = statistics.stdev(diffs)
            t = statistics.mean(diffs) / (d_std / math.sqrt(len(diffs))) if d_std > 0 else float("nan")
            paired = (f"{statistics.mean(diffs):+.2f} ± {d_std:.2f}, t = {t:.2f}, "
                      f"{sum(d > 0 for d in diffs)} of {len(diffs)}")
        scen = "; ".join(f"{r['divergent']}/{r['convergent']}" for r in mine)
        rows.append(f"| {variant} | {100 * statistics.mean(accs):.2f} ± {100 * std:.2f} | "
                    f"{', '.join(f'{100 * a:.1f}' for a in accs)} | {paired} | {scen} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=("digits", "recall"), default="digits")
    p.add_argument("--epochs", type=int, default=6, help="digits: training epochs")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS),
                   help="default: all (digits), all without reordering (recall)")
    p.add_argument("--depth", type=int, default=None, help="model depth (the paper's dynamics are over depth)")
    p.add_argument("--share-layers", action="store_true", help="digits: one block applied depth times (the paper's setting)")
    p.add_argument("--recall", nargs="*", default=[], metavar="KEY=VALUE", help=f"recall settings to change, of {RECALL}")
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once, in worker processes")
    p.add_argument("--threads-per-job", type=int, default=1)
    p.add_argument("--out", default=None, help="JSON file to write")
    p.add_argument("--tabulate", nargs="+", default=None, metavar="JSON",
                   help="train nothing: print the table of the runs saved in these files together (same task and seeds)")
    args = p.parse_args(argv)
    if args.tabulate:
        runs = [r for f in args.tabulate for r in json.loads(Path(f).read_text())["runs"]]
        print(summary_table(runs, list(dict.fromkeys(r["variant"] for r in runs))))
        return 0
    variants = args.variants or [v for v in VARIANTS if args.task == "digits" or "reorder" not in v]
    if args.task == "recall" and any(VARIANTS[v].get("reorder_tokens") for v in variants):
        p.error("--task recall: reordering variants would let the query see later tokens of a causal model")
    if args.task == "digits":
        # Settings travel in cfg: worker processes (spawn) re-import this module and see only its defaults.
        model_kwargs = dict(MODEL_KWARGS, depth=args.depth or MODEL_KWARGS["depth"])
        cfg = dict(epochs=args.epochs, share_layers=args.share_layers, model_kwargs=model_kwargs)
        setup = dict(model="vim_tiny", model_kwargs=model_kwargs, share_layers=args.share_layers, epochs=args.epochs)
    else:
        cfg = dict(RECALL)
        for item in args.recall:
            key, _, value = item.partition("=")
            if key not in RECALL:
                p.error(f"--recall: unknown key {key!r}, expected one of {sorted(RECALL)}")
            cfg[key] = type(RECALL[key])(value)
        if args.depth is not None:
            cfg["depth"] = args.depth
        setup = dict(model="MemMambaModel(memory=False)", recall=cfg, test_seed=RECALL_TEST_SEED)
    jobs = [(args.task, v, s, cfg, args.device) for v in variants for s in args.seeds]
    start = time.perf_counter()
    if args.jobs > 1:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context, initializer=_worker_init,
                                                    initargs=(args.threads_per_job,)) as pool:
            futures = [pool.submit(run_one, *job) for job in jobs]
            runs = []
            for f in concurrent.futures.as_completed(futures):
                runs.append(f.result())
                print(json.dumps(runs[-1]), flush=True)
        order = {(v, s): i for i, (_, v, s, _, _) in enumerate(jobs)}
        runs.sort(key=lambda r: order[r["variant"], r["seed"]])
    else:
        runs = []
        for job in jobs:
            runs.append(run_one(*job))
            print(json.dumps(runs[-1]), flush=True)
    table = summary_table(runs, variants)
    print(table)
    if args.out:
        result = dict(command="PYTHONPATH=. python benchmarks/token_dynamics.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
                      task=args.task, **setup, seeds=args.seeds, device=args.device, jobs=args.jobs,
                      threads=args.threads_per_job if args.jobs > 1 else torch.get_num_threads(), torch=torch.__version__,
                      wall_seconds=round(time.perf_counter() - start, 1), runs=runs, table=table)
        if args.device.startswith("cuda"):
            result["gpu"] = torch.cuda.get_device_name()
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
