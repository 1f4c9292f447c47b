"""SSD (Mamba-2) scan op folder: ``op`` (API, dispatch, one-step update), ``naive`` (sequential oracle),
``chunked`` (the state-space-duality matrix form, the CPU path)."""
from .chunked import ssd_scan_chunked
from .naive import ssd_scan_naive
from .op import ssd_scan, ssd_step

__all__ = ["ssd_scan", "ssd_step", "ssd_scan_naive", "ssd_scan_chunked"]
