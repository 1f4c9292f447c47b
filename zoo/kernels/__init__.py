"""Triton kernels with their torch.library custom ops and autograd (import the op folders
lazily: they need triton, and a GPU unless TRITON_INTERPRET=1).

- ``zoo.kernels.selective_scan``: the selective scan, forward/backward, multi-direction, packed.
- ``zoo.kernels.conv1d``: causal depthwise conv1d with optional SiLU.
- ``zoo.kernels.norm``: fused residual add + RMSNorm.
- ``zoo.kernels.state_update``: the one-step state update for decoding (Mamba-1 and SSD).
"""
