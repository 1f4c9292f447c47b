"""Triton selective scan: forward/backward kernels (``kernels``), custom ops with autograd and the
entry points (``function``)."""
from .function import direction_flags, selective_scan_multi_triton, selective_scan_triton

__all__ = ["selective_scan_triton", "selective_scan_multi_triton", "direction_flags"]
