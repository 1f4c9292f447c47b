"""Forecasting baselines that S-Mamba is compared with, all (batch, seq_len, n) -> (batch, pred_len, n).

- ``LastValue``: repeats the last observed value (the naive forecast).
- ``SeasonalNaive``: repeats the last observed season of ``period`` steps.
- ``DLinear``: moving-average trend + remainder, one Linear over time for each (Zeng et al., AAAI 2023).
- ``ITransformer``: variate tokens through a Transformer encoder (Liu et al., ICLR 2024), the model
  S-Mamba is built on, with self-attention where S-Mamba has its two Mambas.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .smamba import instance_norm

__all__ = ["LastValue", "SeasonalNaive", "DLinear", "ITransformer"]


def _check(name: str, x: torch.Tensor, seq_len: int) -> None:
    if x.dim() != 3 or x.shape[1] != seq_len:
        raise ValueError(f"{name}: expected input of shape (batch, {seq_len}, n_variates), got {tuple(x.shape)}")


class LastValue(nn.Module):
    """Forecast every future step as the last observed value."""

    def __init__(self, seq_len: int, pred_len: int):
        super().__init__()
        self.seq_len, self.pred_len = seq_len, pred_len

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check(type(self).__name__, x, self.seq_len)
        return x[:, -1:].expand(-1, self.pred_len, -1)


class SeasonalNaive(nn.Module):
    """Forecast step t as the value one season earlier: the last ``period`` steps, repeated."""

    def __init__(self, seq_len: int, pred_len: int, period: int):
        super().__init__()
        if not 1 <= period <= seq_len:
            raise ValueError(f"SeasonalNaive: period must be in 1..seq_len={seq_len}, got {period}")
        self.seq_len, self.pred_len, self.period = seq_len, pred_len, period

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check(type(self).__name__, x, self.seq_len)
        season = x[:, -self.period:]
        reps = -(-self.pred_len // self.period)
        return season.repeat(1, reps, 1)[:, : self.pred_len]


def moving_average(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """Centred moving average over time of (b, l, n), ends padded by repeating the edge values."""
    left, right = (kernel - 1) // 2, kernel // 2
    padded = F.pad(x.transpose(1, 2), (left, right), mode="replicate")
    return F.avg_pool1d(padded, kernel, stride=1).transpose(1, 2)


class DLinear(nn.Module):
    """x = trend (moving average) + remainder; forecast = Linear_t(trend) + Linear_s(remainder) over time,
    shared by all variates. Both weights start at the average over the window, as in the paper's code."""

    def __init__(self, seq_len: int, pred_len: int, kernel: int = 25):
        super().__init__()
        self.seq_len, self.pred_len, self.kernel = seq_len, pred_len, kernel
        self.linear_trend = nn.Linear(seq_len, pred_len)
        self.linear_seasonal = nn.Linear(seq_len, pred_len)
        for lin in (self.linear_trend, self.linear_seasonal):
            nn.init.constant_(lin.weight, 1.0 / seq_len)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check(type(self).__name__, x, self.seq_len)
        trend = moving_average(x, self.kernel)
        out = self.linear_trend(trend.transpose(1, 2)) + self.linear_seasonal((x - trend).transpose(1, 2))
        return out.transpose(1, 2)


class ITransformer(nn.Module):
    """Variate tokens (Linear over the window) -> post-norm Transformer encoder -> LayerNorm -> Linear
    to the horizon, with the same per-instance normalisation and timestamp tokens as S-Mamba."""

    def __init__(
        self, seq_len: int, pred_len: int, d_model: int = 128, n_heads: int = 8, e_layers: int = 2,
        d_ff: Optional[int] = None, dropout: float = 0.1, use_norm: bool = True,
    ):
        super().__init__()
        self.seq_len, self.pred_len, self.use_norm = seq_len, pred_len, use_norm
        self.embed = nn.Linear(seq_len, d_model)
        self.drop = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(
            d_model, n_heads, d_ff or 4 * d_model, dropout, activation="gelu", batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, e_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, pred_len)

    def forward(self, x: torch.Tensor, x_mark: Optional[torch.Tensor] = None) -> torch.Tensor:
        _check(type(self).__name__, x, self.seq_len)
        n = x.shape[2]
        if self.use_norm:
            x, mean, std = instance_norm(x)
        if x_mark is not None:
            x = torch.cat([x, x_mark.to(x.dtype)], dim=2)  # covariates become extra tokens
        tokens = self.norm(self.encoder(self.drop(self.embed(x.transpose(1, 2)))))
        out = self.head(tokens).transpose(1, 2)[:, :, :n]
        return out * std + mean if self.use_norm else out
