"""``zoo generate NAME --prompt ...``: continue a prompt with a language-model entry, printing tokens as they come."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from zoo.tasks.engine import number_arg

# The GPT-NeoX tokenizer the Mamba checkpoints were trained with (their state-spaces folders do not carry it).
DEFAULT_TOKENIZER = "hf-hub:EleutherAI/gpt-neox-20b/tokenizer.json"


def add_cli(subparsers) -> None:
    from zoo.models.language.generation import LIMITS

    def limit(name: str):
        return number_arg(**LIMITS[name])

    p = subparsers.add_parser(
        "generate", help="continue a prompt with a language model (mamba_130m, mamba2_130m, ...)",
        description="Generate text with a language-model entry; tokens are printed as they come. Greedy by default "
                    "(as mamba-ssm's generate); --temperature > 0 with --top-k 0 or > 1 samples.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("name", help="language-model entry, e.g. mamba_130m or mamba_130m.hf (see `zoo list 'mamba*'`)")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=limit("max_new_tokens"), default=64, help="tokens to generate at most")
    p.add_argument("--temperature", type=limit("temperature"), default=1.0, help="softmax temperature (0: greedy)")
    p.add_argument("--top-k", type=limit("top_k"), default=1, help="sample among the k most likely tokens (1: greedy, 0: all)")
    p.add_argument("--top-p", type=limit("top_p"), default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument("--repetition-penalty", type=limit("repetition_penalty"), default=1.0, help="CTRL penalty (1: off)")
    p.add_argument("--seed", type=number_arg(int, 0), default=0, help="seed of the sampling")
    p.add_argument("--checkpoint-path", default=None, help="weights file (state-spaces or transformers layout) instead "
                   "of the entry's pretrained weights")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json or a folder holding one, or 'bytes' (default: the "
                   "entry's own for the byte-level entries, else the one beside --checkpoint-path, else the one of the "
                   "weights' -hf repository, else "
                   f"{DEFAULT_TOKENIZER}; hf-hub files come from the Hugging Face cache)")
    p.add_argument("--model-kwargs", nargs="+", default=[], metavar="KEY=VALUE",
                   help="more create_model arguments, e.g. n_layer=2 d_model=64 (for a file of another size)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"], help="weights dtype")
    p.set_defaults(func=_cli_generate)


def _tokenizer_source(args, cfg: dict) -> str:
    """--tokenizer; else the entry's own (cfg's architecture; the byte-level entries: "bytes"); else the tokenizer.json beside
    --checkpoint-path; else the one in the weights' repository (transformers' -hf repositories carry it); else
    GPT-NeoX's."""
    from zoo.models.language import entry_tokenizer

    if args.tokenizer:
        return args.tokenizer
    if entry_tokenizer(cfg.get("architecture", "")):
        return entry_tokenizer(cfg["architecture"])
    if args.checkpoint_path:
        beside = Path(args.checkpoint_path).parent / "tokenizer.json"
        return str(beside) if beside.is_file() else DEFAULT_TOKENIZER
    if str(cfg.get("hf_hub_id", "")).endswith("-hf"):
        return f"hf-hub:{cfg['hf_hub_id']}/tokenizer.json"
    return DEFAULT_TOKENIZER


def _cli_generate(args: argparse.Namespace) -> int:
    import zoo
    from zoo.models.language import load_tokenizer
    from zoo.tasks.classification import parse_model_kwargs

    device = torch.device(args.device)  # a bad device name fails here, before any loading
    info = zoo.model_info(args.name)
    if not info["module"].startswith("zoo.models.language"):
        raise ValueError(f"'{args.name}' is not a language model (it comes from {info['module']}); see `zoo list 'mamba*'`")
    cfg = info["pretrained_cfgs"].get(f"{info['architecture']}.{info['tag']}", {}) if info["tag"] else {}
    cfg = {**cfg, "architecture": info["architecture"]}
    tokenizer = load_tokenizer(_tokenizer_source(args, cfg))
    model = zoo.create_model(args.name, pretrained=args.checkpoint_path is None, checkpoint_path=args.checkpoint_path,
                             **parse_model_kwargs(args.model_kwargs))
    model = model.to(device=device, dtype=getattr(torch, args.dtype)).eval()
    generator = torch.Generator(device).manual_seed(args.seed)
    shown = []

    def stream(_, token):
        # Print the text grown by this token (byte-level BPE and byte tokens: a character can span tokens, so an
        # incomplete one at the end, decoded as U+FFFD, waits for the next token).
        shown.append(token)
        text = tokenizer.decode(shown)
        if text.endswith("\ufffd"):
            return
        sys.stdout.write(text[len(stream.printed):])
        sys.stdout.flush()
        stream.printed = text

    stream.printed = ""
    sys.stdout.write(args.prompt)
    model.generate(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, repetition_penalty=args.repetition_penalty, eos_token_id=tokenizer.eos_token_id,
                   streamer=stream, tokenizer=tokenizer, generator=generator)
    sys.stdout.write(tokenizer.decode(shown)[len(stream.printed):] + "\n")  # what a held-back end left
    return 0
