"""Byte-level language modelling: training batches and held-out perplexity (the zoo's small LMs, benchmarks/train_lm.py).

A byte stream (uint8, :func:`zoo.data.kjv.encode_bytes`) is the token sequence. Training draws random windows of
``seq_len + 1`` bytes; :func:`evaluate_lm` scores every byte of a held-out stream but the first exactly once, in
consecutive windows of ``seq_len`` targets (each window reads only its own bytes: the context restarts at every
window), and reports the mean negative log-likelihood per byte in nats, the perplexity per byte (exp of it) and bits
per byte (nats / ln 2).
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from zoo.core.checks import check_int

__all__ = ["random_windows", "evaluate_lm", "lm_loss"]


def _check_stream(stream: torch.Tensor, what: str, seq_len: int) -> None:
    if not isinstance(stream, torch.Tensor) or stream.dim() != 1 or stream.dtype.is_floating_point or stream.dtype == torch.bool:
        got = f"{tuple(stream.shape)} {stream.dtype}" if isinstance(stream, torch.Tensor) else type(stream).__name__
        raise ValueError(f"{what}: expected a (length,) tensor of integer token ids (bytes), got {got}")
    if stream.numel() < 2:
        raise ValueError(f"{what}: the stream has {stream.numel()} tokens; at least 2 are needed (an input and a target)")
    check_int(f"{what}: seq_len", seq_len, 1)


def random_windows(stream: torch.Tensor, seq_len: int, batch_size: int, generator: torch.Generator):
    """(inputs, targets), each (batch_size, seq_len) int64: windows of ``stream`` at random starts drawn with
    ``generator`` (CPU), targets shifted by one byte."""
    _check_stream(stream, "random_windows", seq_len)
    check_int("random_windows: batch_size", batch_size, 1)
    if stream.numel() < seq_len + 1:
        raise ValueError(f"random_windows: the stream ({stream.numel()} tokens) is shorter than one window of "
                         f"seq_len + 1 = {seq_len + 1}; use a shorter --seq-len or more text")
    starts = torch.randint(0, stream.numel() - seq_len, (batch_size,), generator=generator)
    windows = stream[starts[:, None] + torch.arange(seq_len + 1)].long()
    return windows[:, :-1], windows[:, 1:]


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy in float32 over the first ``vocab_size`` logits (the padding rows of a padded vocabulary are
    never targets)."""
    return F.cross_entropy(logits[..., :vocab_size].float().flatten(0, -2), targets.flatten(), reduction=reduction)


@torch.no_grad()
def evaluate_lm(model, stream: torch.Tensor, seq_len: int, batch_size: int = 16, device=None,
                amp_dtype: Optional[torch.dtype] = None, max_windows: Optional[int] = None) -> Dict[str, float]:
    """Held-out likelihood of ``stream`` under ``model`` (token ids (batch, length) -> logits).

    Windows of ``seq_len`` targets at stride ``seq_len``; the last, shorter window scores what is left, so every
    byte after the first is scored once (``max_windows``: only the first that many full windows, for a quick
    validation estimate). ``amp_dtype``: autocast dtype on CUDA (None: the model's own dtype).
    Returns nll (nats per byte), ppl (per byte), bpb (bits per byte), bytes (targets scored), seq_len, windows.
    """
    _check_stream(stream, "evaluate_lm", seq_len)
    check_int("evaluate_lm: batch_size", batch_size, 1)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    n_targets = stream.numel() - 1
    full = n_targets // seq_len
    if max_windows is not None:
        full = min(full, check_int("evaluate_lm: max_windows", max_windows, 1))
    rest = 0 if max_windows is not None and full >= max_windows else n_targets - full * seq_len
    vocab = getattr(model, "vocab_size", None)
    total, count, windows = 0.0, 0, 0

    def score(inputs, targets):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(inputs.to(device))
        return float(lm_loss(logits, targets.to(device), vocab or logits.shape[-1], reduction="sum"))

    try:
        starts = torch.arange(full) * seq_len
        for i in range(0, full, batch_size):
            s = starts[i:i + batch_size]
            w = stream[s[:, None] + torch.arange(seq_len + 1)].long()
            total += score(w[:, :-1], w[:, 1:])
            count += w.shape[0] * seq_len
            windows += w.shape[0]
        if rest:
            w = stream[full * seq_len:].long()[None]
            total += score(w[:, :-1], w[:, 1:])
            count += rest
            windows += 1
    finally:
        model.train(was_training)
    nll = total / count
    return {"nll": nll, "ppl": math.exp(nll), "bpb": nll / math.log(2), "bytes": count, "seq_len": seq_len,
            "windows": windows}
