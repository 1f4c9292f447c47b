"""Time-series models: S-Mamba (forecasting over variate tokens, and a classifier on the same encoder)
and the forecasting baselines it is compared with."""
from . import smamba  # noqa: F401  (registers the entries)
from .baselines import DLinear, ITransformer, LastValue, SeasonalNaive
from .smamba import SMamba, SMambaClassifier, SMambaEncoder, SMambaLayer, checkpoint_filter_fn, instance_norm

__all__ = [
    "SMamba", "SMambaClassifier", "SMambaEncoder", "SMambaLayer", "checkpoint_filter_fn", "instance_norm",
    "LastValue", "SeasonalNaive", "DLinear", "ITransformer",
]
