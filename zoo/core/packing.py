"""Packed variable-length sequences (``cu_seqlens``) on the PyTorch paths: padded to one batch and back."""
from __future__ import annotations

import torch


class Packing:
    """Index maps between a packed (1, total, ...) tensor and a padded (num_seqs, max_len, ...) batch.

    ``cu_seqlens`` is [0, l1, l1 + l2, ..., total] (validated by the caller)."""

    def __init__(self, cu_seqlens: torch.Tensor, total: int, device: torch.device):
        bounds = cu_seqlens.to(device=device, dtype=torch.long)
        lens = bounds[1:] - bounds[:-1]
        self.num_seqs = lens.numel()
        self.seq_id = torch.repeat_interleave(torch.arange(self.num_seqs, device=device), lens, output_size=total)
        self.pos = torch.arange(total, device=device) - bounds[:-1][self.seq_id]
        self.max_len = int(lens.max()) if self.num_seqs else 0

    def pad(self, t: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """(1, total, ...) -> (num_seqs, max_len, ...), ``fill`` after each sequence's end."""
        out = t.new_full((self.num_seqs, self.max_len, *t.shape[2:]), fill)
        out[self.seq_id, self.pos] = t[0]
        return out

    def unpad(self, t: torch.Tensor) -> torch.Tensor:
        """(num_seqs, max_len, ...) -> (1, total, ...)."""
        return t[self.seq_id, self.pos].unsqueeze(0)
