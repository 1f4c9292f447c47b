"""Distributed fine-tuning on CPU: 2 processes over gloo (DDP and FSDP2), layer-wise lr decay, EMA, resume.

A 2-block, 32-wide Vim on 16x16 inputs keeps every process start and step to seconds on 2 cores.
"""
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from benchmark_scripts import load_benchmark

import zoo
from zoo.tasks.engine import (
    DistContext, ShardSampler, backward_and_step, cosine_with_warmup, create_ema, create_optimizer, full_model_state_dict,
    init_distributed, read_training_state, unwrap_model, wrap_model,
)

ROOT = Path(__file__).resolve().parents[1]
TINY_KW = dict(num_classes=10, img_size=16, patch_size=4, stride=4, depth=2, embed_dim=32, drop_path_rate=0.0)  # no random draws
BATCH = 4  # per process; the single-process reference takes both halves at once
STEPS = 3

needs_dist = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is not available")
needs_sklearn = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="digits needs scikit-learn (the data extra)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model():
    torch.manual_seed(0)
    return zoo.create_model("vim_tiny", **TINY_KW)


def global_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2 * BATCH, 3, 16, 16, generator=g), torch.randint(0, 10, (2 * BATCH,), generator=g)


def run_steps(ctx: DistContext, strategy: str):
    """STEPS AdamW steps (layer decay 0.5, clipping, warmup + cosine, EMA 0.5) on this process's share of
    the global batch; returns the full state dicts of the model and the EMA (complete on rank 0)."""
    model = tiny_model()
    ema = create_ema(model, 0.5, ctx, strategy)
    model = wrap_model(model, ctx, strategy)
    opt = create_optimizer(unwrap_model(model), lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    sched = cosine_with_warmup(opt, total_steps=STEPS, warmup_steps=1, min_lr=1e-5, base_lr=1e-3)
    x, y = global_batch()
    if ctx.distributed:
        x, y = x[ctx.rank * BATCH:(ctx.rank + 1) * BATCH], y[ctx.rank * BATCH:(ctx.rank + 1) * BATCH]
    model.train()
    for _ in range(STEPS):
        loss = F.cross_entropy(model(x), y)
        backward_and_step(loss, model, opt, clip_grad=1.0)
        ema.update(unwrap_model(model))
        sched.step()
    return full_model_state_dict(model, ctx), full_model_state_dict(ema.module, ctx)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    ctx = init_distributed("cpu")
    try:
        for strategy in ("ddp", "fsdp"):
            weights, ema = run_steps(ctx, strategy)
            if ctx.is_main:
                torch.save({"model": weights, "ema": ema}, os.path.join(out_dir, f"{strategy}.pt"))
        # DDP replicas: every rank's own copy of the weights, to check they are identical.
        model = wrap_model(tiny_model(), ctx, "ddp")
        opt = create_optimizer(unwrap_model(model), lr=1e-3, weight_decay=0.05)
        x, y = global_batch()
        for _ in range(STEPS):
            backward_and_step(F.cross_entropy(model(x[rank::world]), y[rank::world]), model, opt, clip_grad=1.0)
        torch.save(unwrap_model(model).state_dict(), os.path.join(out_dir, f"replica{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return out


@needs_dist
def test_ddp_replicas_identical(two_process_run):
    r0, r1 = (torch.load(two_process_run / f"replica{r}.pt", weights_only=True) for r in (0, 1))
    assert r0.keys() == r1.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"{k} differs between rank 0 and rank 1"


@needs_dist
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_single_process(two_process_run, strategy):
    """2 processes x 4 samples == 1 process x the same 8 samples, for the weights and for the EMA."""
    got = torch.load(two_process_run / f"{strategy}.pt", weights_only=True)
    torch.set_num_threads(1)
    ref_model, ref_ema = run_steps(DistContext(), strategy)
    init = tiny_model().state_dict()
    assert got["model"].keys() == ref_model.keys()
    moved = 0
    for k in ref_model:
        torch.testing.assert_close(got["model"][k], ref_model[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{strategy} {k}: {m}")
        torch.testing.assert_close(got["ema"][k], ref_ema[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{strategy} EMA {k}: {m}")
        moved += not torch.equal(ref_model[k], init[k])
    assert moved > len(ref_model) // 2  # training did move the weights: the comparison is not between two inits


def test_layer_decay_groups_scale_lr_per_block():
    model = tiny_model()
    opt = create_optimizer(model, lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    # group_matcher: stem (cls_token, pos_embed, patch_embed) = layer 0, layers.0 = 1, layers.1 and norm_f
    # (Vim's matcher puts the final norm with the last block) = 2, the head (unmatched) = 3, the top:
    # scales 0.5 ** (3 - layer).
    expected = {"cls_token": 0.125, "pos_embed": 0.125, "patch_embed": 0.125, "layers.0": 0.25, "layers.1": 0.5,
                "norm_f": 0.5, "head": 1.0}
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert sum(len(g["params"]) for g in opt.param_groups) == len(names)
    for name, p in names.items():
        prefix = next(k for k in expected if name.startswith(k))
        g = group_of[id(p)]
        assert g["lr_scale"] == pytest.approx(expected[prefix]), name
        assert g["lr"] == pytest.approx(1e-3 * expected[prefix]), name
        no_decay = p.ndim <= 1 or name in ("pos_embed", "cls_token")
        assert g["weight_decay"] == (0.0 if no_decay else 0.05), name
    # The schedule keeps the ratios: every group follows the same warmup + cosine factor.
    sched = cosine_with_warmup(opt, total_steps=10, warmup_steps=2, min_lr=1e-5, base_lr=1e-3)
    for _ in range(5):
        opt.step()
        sched.step()
    top = next(g["lr"] for g in opt.param_groups if g["lr_scale"] == 1.0)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(top * g["lr_scale"])


def test_ema_updates_by_decay():
    model = tiny_model()
    ema = create_ema(model, 0.9, DistContext())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = create_optimizer(model, lr=1e-2, weight_decay=0.05)
    x, y = global_batch()
    backward_and_step(F.cross_entropy(model(x), y), model, opt)
    ema.update(model)
    after = model.state_dict()
    differs = 0
    for k, v in ema.module.state_dict().items():
        torch.testing.assert_close(v, 0.9 * before[k] + 0.1 * after[k], msg=lambda m: f"EMA {k}: {m}")
        differs += not torch.equal(v, after[k])
    assert differs > len(after) // 2  # the EMA is not the raw weights


def test_shard_sampler_covers_every_sample_once():
    n, world = 11, 3
    samplers = [ShardSampler(n, r, world) for r in range(world)]
    assert {len(s) for s in samplers} == {4}  # equal length: every rank runs the same number of batches
    real = [i for s in samplers for i in list(s)[: s.num_valid]]
    assert sorted(real) == list(range(n))


def test_resume_rejects_files_that_are_not_training_checkpoints(tmp_path):
    weights = tmp_path / "weights.pt"
    torch.save(tiny_model().state_dict(), weights)
    with pytest.raises(ValueError, match="expected format 'zoo-training-state'"):
        read_training_state(weights)
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        read_training_state(tmp_path / "missing.pt")


TINY_JOB = ["--epochs", "2", "--limit-train-batches", "2", "--batch-size", "8", "--img-size", "16", "--patch-size", "4",
            "--depth", "2", "--model-kwargs", "embed_dim=32", "--no-progress", "--threads", "1",
            "--ema-decay", "0.9", "--layer-decay", "0.7"]


def torchrun_finetune(args, port):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "zoo", "finetune", *TINY_JOB, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@needs_dist
@needs_sklearn
def test_torchrun_finetune_resume_continues_exactly(tmp_path):
    """`torchrun --nproc_per_node 2 -m zoo finetune`: one uninterrupted 2-epoch run, and a run resumed from its
    epoch-1 checkpoint, end with the same weights (bit for bit); rank 0 alone prints and writes."""
    from safetensors.torch import load_file

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    out = torchrun_finetune(["--save-every", "1", "--output", str(full)], free_port())
    assert out.count("top-1 accuracy") == 1 and "2 processes (ddp), batch 8 per process = 16 global" in out
    result = json.loads((full / "result.json").read_text())
    assert result["world_size"] == 2 and result["test_images"] == 360  # the accuracy is over the whole test split
    assert result["evaluated_weights"].startswith("EMA")
    ckpt = read_training_state(full / "checkpoint-epoch1.pt")  # weights_only=True
    assert ckpt["epoch"] == 1 and len(ckpt["rng"]) == 2 and ckpt["ema"] is not None

    out = torchrun_finetune(["--resume", str(full / "checkpoint-epoch1.pt"), "--output", str(resumed)], free_port())
    assert "1 of 2 epochs done" in out
    a, b = load_file(str(full / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads((resumed / "result.json").read_text())["accuracy"] == result["accuracy"]


def test_ddp_scaling_worker_and_summary(tmp_path, monkeypatch):
    """benchmarks/ddp_scaling.py: its per-process worker at a tiny size in this process (no torchrun; the full
    1-vs-2-process launch is the command in the README), and the efficiency arithmetic."""
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    bench = load_benchmark("ddp_scaling")
    out = tmp_path / "n1.json"
    assert bench.main(["--device", "cpu", "--model", "vim_tiny", "--img-size", "16", "--batch-per-gpu", "2", "--amp", "none",
                       "--warmup", "1", "--steps", "1", "--model-kwargs", "depth=1", "embed_dim=32", "patch_size=4", "stride=4",
                       "--worker", str(out)]) == 0
    run = json.loads(out.read_text())
    assert run["nproc"] == 1 and run["timed_images"] == 2 and run["images_per_s"] > 0 and run["params"] > 0
    summary = bench.scaling_summary({"nproc": 1, "images_per_s": 100.0}, {"nproc": 2, "images_per_s": 180.0})
    assert summary == {"nproc": 2, "speedup": pytest.approx(1.8), "efficiency": pytest.approx(0.9)}
