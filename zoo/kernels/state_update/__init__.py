"""The one-step state update for decoding (``zoo.core.selective_scan.step``), as one Triton kernel."""
from .function import selective_state_update_triton

__all__ = ["selective_state_update_triton"]
