"""The SSD (Mamba-2) scan in Triton: forward, backward (zoo.core.ssd is the public op and the reference)."""
from .function import ssd_scan_triton

__all__ = ["ssd_scan_triton"]
