"""Selective scan op folder: ``op`` (API and dispatch), ``naive`` (sequential oracle),
``chunked`` (fast PyTorch path). The Triton kernels live in ``zoo.kernels.selective_scan``."""
from .chunked import selective_scan_chunked
from .naive import selective_scan_naive
from .op import selective_scan, selective_scan_fn, selective_scan_multi

__all__ = ["selective_scan", "selective_scan_fn", "selective_scan_multi", "selective_scan_naive", "selective_scan_chunked"]
