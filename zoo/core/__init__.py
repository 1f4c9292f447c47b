"""The shared selective-scan core: op, mixers, norms and blocks used by every model family."""
from .block import ResidualBlock, add_norm, init_mamba_weights
from .mamba import BiMamba, Mamba, causal_conv1d
from .norm import RMSNorm, rms_norm
from .selective_scan import selective_scan, selective_scan_fn

__all__ = [
    "selective_scan", "selective_scan_fn", "Mamba", "BiMamba", "causal_conv1d",
    "RMSNorm", "rms_norm", "ResidualBlock", "add_norm", "init_mamba_weights",
]
