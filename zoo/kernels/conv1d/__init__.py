"""Triton causal depthwise conv1d over channels-last (batch, length, dim) tensors, with an
optional fused SiLU, forward and backward, registered as torch.library custom ops."""
from .function import causal_conv1d_triton
from .update import causal_conv1d_update_triton

__all__ = ["causal_conv1d_triton", "causal_conv1d_update_triton"]
