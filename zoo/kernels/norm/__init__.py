"""Triton fused residual add + RMSNorm (forward and backward, torch.library custom ops)."""
from .function import add_rms_norm_triton

__all__ = ["add_rms_norm_triton"]
