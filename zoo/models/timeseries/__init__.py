"""Time-series models: S-Mamba (forecasting over variate tokens, and a classifier on the same encoder),
Chimera (a 2-D selective SSM over variates x time, forecaster and classifier) and the forecasting baselines
they are compared with."""
from . import chimera, smamba  # noqa: F401  (registers the entries)
from .baselines import DLinear, ITransformer, LastValue, SeasonalNaive
from .chimera import Chimera, ChimeraClassifier, chimera_scan, chimera_scan_naive
from .smamba import SMamba, SMambaClassifier, SMambaEncoder, SMambaLayer, checkpoint_filter_fn, instance_norm

__all__ = [
    "SMamba", "SMambaClassifier", "SMambaEncoder", "SMambaLayer", "checkpoint_filter_fn", "instance_norm",
    "LastValue", "SeasonalNaive", "DLinear", "ITransformer",
    "Chimera", "ChimeraClassifier", "chimera_scan", "chimera_scan_naive",
]
