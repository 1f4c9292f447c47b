"""CPU training speed of the main job's model against a matched timm ViT, in one process, interleaved rounds.

    PYTHONPATH=. python benchmarks/cpu_train.py [--threads 1 2] [--rounds 5] [--steps 5] [--long] \
        [--out benchmarks/results/cpu_train.json] [--note "..."]

Models (batch 64, random 32x32 images, cross-entropy, backward, AdamW step, float32):

- ``vim_fused``: ``zoo finetune``'s default model (vim_tiny's width: embed 192, d_state 16, bidirectional
  Mamba blocks, depth 6, 8x8 patches: 16 tokens + the class token) with ``impl="auto"``, i.e. the fused numba
  scan when numba is installed;
- ``vim_chunked``: the same model as a user without numba runs it (the chunked PyTorch scan);
- ``vit``: timm's ViT-Ti (embed 192, 3 heads, MLP ratio 4) at depth 6 on the same 8x8 patches (17 tokens).

Each round runs every model for ``--steps`` steps; reported per thread count: the median images/s of each model
and the medians of the per-round ratios (vit / vim_fused: how far the Mamba model is from the ViT; vim_fused /
vim_chunked: what the fused CPU path gives). ``--long`` adds the same pair at 128x128 (256 patches + the class
token, batch 8): thread scaling for a long sequence. The machine may be shared: the JSON records the load
average before and after, and ``--note``.
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
import torch.nn.functional as F


def vim_model(img_size=32, batch=64):
    import zoo
    from zoo.tasks.classification import FinetuneConfig, model_kwargs_for

    cfg = FinetuneConfig(img_size=img_size)
    torch.manual_seed(0)
    return zoo.create_model(cfg.model, **model_kwargs_for(cfg, 10)), cfg


def vit_model(img_size=32):
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img_size, patch_size=8, depth=6,
                             num_classes=10)


class Trainer:
    def __init__(self, model, batch, img_size, fused=True):
        self.model, self.batch, self.fused = model.train(), batch, fused
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(batch, 3, img_size, img_size, generator=g)
        self.y = torch.randint(0, 10, (batch,), generator=g)

    def run(self, steps):
        """images/s over ``steps`` training steps."""
        from zoo.core.selective_scan import cpu_fused

        numba_module = cpu_fused.numba
        if not self.fused:
            cpu_fused.numba = None  # as without numba: impl="auto" takes the chunked path
        try:
            t0 = time.perf_counter()
            for _ in range(steps):
                loss = F.cross_entropy(self.model(self.x), self.y)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
            return steps * self.batch / (time.perf_counter() - t0)
        finally:
            cpu_fused.numba = numba_module


def rounds(trainers, steps, n_rounds):
    for t in trainers.values():  # warm-up (numba's compile or cache load, allocator)
        t.run(1)
    ips = {k: [] for k in trainers}
    for _ in range(n_rounds):
        for k, t in trainers.items():
            ips[k].append(t.run(steps))
    return ips


def ratio(ips, a, b):
    """median over rounds of ips[a] / ips[b]"""
    return statistics.median(x / y for x, y in zip(ips[a], ips[b]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5, help="training steps per model per round")
    ap.add_argument("--long", action="store_true", help="also the 128x128 (257-token) pair, batch 8")
    ap.add_argument("--no-chunked", action="store_true", help="skip the chunked-scan model (slow)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--note", default=None)
    args = ap.parse_args()
    from zoo.core.selective_scan import cpu_fused

    rows = []
    meta = dict(command="python " + " ".join(sys.argv), torch=torch.__version__,
                numba=getattr(cpu_fused.numba, "__version__", None), processor=platform.processor() or platform.machine(),
                logical_cpus=os.cpu_count(), rounds=args.rounds, steps_per_round=args.steps, note=args.note,
                load_average_before=os.getloadavg())

    def save():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(dict(meta={**meta, "load_average_after": os.getloadavg()}, rows=rows), f, indent=1)

    cases = [("main job (17 tokens, batch 64)", 32, 64)] + ([("long (257 tokens, batch 8)", 128, 8)] if args.long else [])
    for name, img, batch in cases:
        vim, _ = vim_model(img)
        trainers = {"vim_fused": Trainer(vim, batch, img)}
        if not args.no_chunked:
            vim2, _ = vim_model(img)
            trainers["vim_chunked"] = Trainer(vim2, batch, img, fused=False)
        trainers["vit"] = Trainer(vit_model(img), batch, img)
        for threads in args.threads:
            torch.set_num_threads(threads)
            ips = rounds(trainers, args.steps, args.rounds)
            if torch.get_num_threads() != threads:
                raise RuntimeError(f"torch's thread count changed to {torch.get_num_threads()} while measuring")
            row = dict(case=name, threads=threads, batch=batch, img_size=img,
                       images_per_s={k: round(statistics.median(v), 2) for k, v in ips.items()},
                       per_round={k: [round(x, 2) for x in v] for k, v in ips.items()},
                       vit_over_vim_fused=round(ratio(ips, "vit", "vim_fused"), 3))
            if "vim_chunked" in ips:
                row["vim_fused_over_chunked"] = round(ratio(ips, "vim_fused", "vim_chunked"), 3)
            rows.append(row)
            print(f"{name}, {threads} thread(s): "
                  + "  ".join(f"{k} {v:.1f} img/s" for k, v in row["images_per_s"].items())
                  + f"  vit/vim_fused x{row['vit_over_vim_fused']:.2f}"
                  + (f"  vim_fused/chunked x{row['vim_fused_over_chunked']:.2f}" if "vim_chunked" in ips else ""),
                  flush=True)
            save()


if __name__ == "__main__":
    main()
