"""Language-model speed (issue 17 item 4): prefill tokens/s at given prompt lengths, decode tokens/s at given batch
sizes (greedy, a fixed number of new tokens), and peak memory, for a zoo LM entry and, beside it in the same process,
Hugging Face transformers' MambaForCausalLM / Mamba2ForCausalLM holding the same weights (converted). Speed does
not depend on the weight values, so random weights serve unless --checkpoint-path is given. Also the time to read
the weights once at the measured copy bandwidth: the floor of a batch-1 decode step.

    # on the GPU machine (the issue's points)
    python benchmarks/lm_generation.py --model mamba_2_8b --prefill 2048 16384 --batch 1 64 --new-tokens 256 \\
        --hf --out $OUT/lm_generation_mamba_2_8b.json
    # a smoke run on a CPU
    python benchmarks/lm_generation.py --model mamba_130m --model-kwargs d_model=64 n_layer=2 --device cpu \\
        --dtype float32 --prefill 64 --batch 1 2 --new-tokens 4 --hf
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Callable

import torch

import zoo
from zoo.models.language.mamba_lm import _HF_NAMES, _hf_config


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# A call slower than this is timed once (its warm-up call is the measurement): transformers' sequential
# pure-PyTorch scan at 16k tokens takes minutes a call.
SLOW_CALL_S = 20.0


def timed(fn: Callable[[], object], device: torch.device, repeats: int = 3) -> tuple[float, int]:
    """(median seconds of ``fn`` after one warm-up call, peak memory in bytes above what was allocated before)."""
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    times = []
    if time.perf_counter() - start > SLOW_CALL_S:
        times, repeats = [time.perf_counter() - start], 0  # peak memory: of this call
    elif device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # peak memory: of the timed calls, not the warm-up
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else 0
    return sorted(times)[len(times) // 2], peak


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes/s of a device-to-device copy (read + write counted), the rate weights are read at."""
    n = nbytes if device.type == "cuda" else nbytes // 16
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds, _ = timed(lambda: dst.copy_(src), device, repeats=5)
    return 2 * n / seconds


@torch.no_grad()
def step_seconds(model, prompt: torch.Tensor, steps: int, device: torch.device) -> float:
    """Median seconds of one decode step after a prefill: the CUDA-graph replay on CUDA, the eager step elsewhere."""
    from zoo.models.language.generation import _GraphedStep

    _, cache = model.prefill(prompt.tolist(), steps + 1)
    tokens = prompt[:, -1].clone()
    step = _GraphedStep(model, cache, prompt.shape[0], device) if device.type == "cuda" else None
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        logits = step(tokens) if step is not None else model._step_logits(tokens, cache)
        tokens = logits.argmax(-1)
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def hf_model(model, device, dtype):
    """transformers' model of the same configuration holding the same weights."""
    import transformers

    config = _hf_config(model)
    kind = config.pop("model_type")
    config.pop("architectures")
    cls, cfg_cls = ((transformers.MambaForCausalLM, transformers.MambaConfig) if kind == "mamba"
                    else (transformers.Mamba2ForCausalLM, transformers.Mamba2Config))
    hf = cls(cfg_cls(**config)).to(device=device, dtype=dtype).eval()
    hf.load_state_dict({_HF_NAMES.get(k, k): v for k, v in model.state_dict().items()}, strict=True)
    return hf


def _save(out: dict, path) -> None:
    if path:
        with open(path, "w") as f:
            f.write(json.dumps(out, indent=1) + "\n")


def run(args, command: str = "") -> dict:
    from zoo.tasks.classification import parse_model_kwargs

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = zoo.create_model(args.model, checkpoint_path=args.checkpoint_path, **parse_model_kwargs(args.model_kwargs))
    model = model.to(device=device, dtype=dtype).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = copy_bandwidth(device)
    out = dict(model=args.model, model_kwargs=args.model_kwargs, device=str(device), dtype=args.dtype,
               gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None, torch=torch.__version__,
               weight_bytes=weight_bytes, copy_bandwidth_bytes_per_s=bandwidth,
               weights_read_ms=1e3 * weight_bytes / bandwidth, zoo={}, transformers={},  # bandwidth: bytes moved
               command=command)
    runners = {"zoo": model}
    if args.hf:
        import transformers

        runners["transformers"] = hf_model(model, device, dtype)
        out["transformers_version"] = transformers.__version__
    g = torch.Generator().manual_seed(0)
    vocab = model.vocab_size
    for name, m in runners.items():
        res = out[name]
        for length in (args.prefill if name == "zoo" or args.hf_prefill is None else args.hf_prefill):
            ids = torch.randint(0, vocab, (1, length), generator=g).to(device)
            if name == "zoo":  # the prefill of generation: the scan returning its final states
                fn = lambda: model.prefill([ids[0].tolist()], 1)  # noqa: E731
            else:
                fn = lambda: m(ids, use_cache=True)  # noqa: E731
            with torch.no_grad():
                seconds, peak = timed(fn, device)
            res[f"prefill_{length}"] = dict(tokens_per_s=length / seconds, seconds=seconds, peak_extra_bytes=peak)
            _save(out, args.out)  # after every point: a run cut short keeps what it measured
        for batch in args.batch:
            prompt = torch.randint(0, vocab, (batch, args.prompt_length), generator=g).to(device)
            n = args.new_tokens
            if name == "zoo":
                fn = lambda: model.generate(prompt, max_new_tokens=n)  # noqa: E731
            else:
                fn = lambda: m.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)  # noqa: E731
            with torch.no_grad():
                seconds, peak = timed(fn, device, repeats=args.repeats)
            res[f"decode_batch_{batch}"] = dict(tokens_per_s=batch * n / seconds, ms_per_step=1e3 * seconds / n,
                                                seconds=seconds, peak_extra_bytes=peak, prompt_length=args.prompt_length,
                                                new_tokens=n)
            if name == "zoo":  # the steady-state step alone (generate above includes the prefill and the graph capture)
                res[f"decode_batch_{batch}"]["step_ms"] = 1e3 * step_seconds(model, prompt, n, device)
            _save(out, args.out)
        if name == "zoo" and "decode_batch_1" in res:
            res["decode_batch_1_step_vs_weights_read"] = res["decode_batch_1"]["step_ms"] / out["weights_read_ms"]
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mamba_2_8b")
    p.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--checkpoint-path", default=None)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--prefill", type=int, nargs="*", default=[2048, 16384], help="prompt lengths of the prefill runs")
    p.add_argument("--batch", type=int, nargs="*", default=[1, 64], help="batch sizes of the decode runs")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt-length", type=int, default=16, help="prompt of each decode run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hf", action="store_true", help="also transformers' model with the same weights")
    p.add_argument("--hf-prefill", type=int, nargs="*", default=None,
                   help="transformers' prompt lengths, when not --prefill's (its sequential scan at 16k takes minutes)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    out = run(args, "python benchmarks/lm_generation.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:]))
    _save(out, args.out)
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
