"""Chimera: the 2-D scan's fast path (one shared-core 1-D scan per variate) against the plain loop over the
grid, in float64 at odd sizes, values and gradients; its 1-D special case against the core's oracle; the models'
shapes, errors, registry entries and the forecasting / classification pipelines."""
import numpy as np
import pytest
import torch

import zoo
from zoo.core.selective_scan import selective_scan_naive
from zoo.models.timeseries import Chimera, ChimeraClassifier, chimera_scan, chimera_scan_naive
from zoo.models.timeseries.chimera import Chimera2DHead

torch.set_num_threads(1)


def scan_inputs(b=2, V=3, T=7, d=6, n=3, groups=None, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    bc = (b, V, T, n) if groups is None else (b, V, T, groups, n)
    return dict(
        x=r(b, V, T, d), dt1=torch.rand(b, V, T, d, generator=g, dtype=dtype) * 0.8 + 0.05,
        dt2=torch.rand(b, V, T, d, generator=g, dtype=dtype) * 0.8 + 0.05,
        A1=-torch.rand(d, n, generator=g, dtype=dtype) - 0.1, A2=r(d, n) * 0.7, A3=r(d, n) * 0.7,
        A4=-torch.rand(d, n, generator=g, dtype=dtype) - 0.1, B1=r(*bc), B2=r(*bc), C1=r(*bc), C2=r(*bc), D=r(d),
    )


@pytest.mark.parametrize("impl", ["auto", "chunked", "naive"])
@pytest.mark.parametrize("groups", [None, 2, 3])
def test_fast_scan_equals_the_loop_over_the_grid(impl, groups):
    args = scan_inputs(groups=groups)
    y_ref, h1_ref, h2_ref = chimera_scan_naive(**args, return_states=True)
    y, h1, h2 = chimera_scan(**args, return_states=True, impl=impl)
    assert y.dtype == torch.float64 and y.shape == (2, 3, 7, 6) and h1.shape == (2, 3, 7, 6, 3)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h1, h1_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h2, h2_ref, rtol=1e-12, atol=1e-12)


def test_the_loop_is_the_recurrence_written_out():
    # One cell by hand: (v, t) = (1, 1) from its two predecessors, with the naive path's own states.
    args = scan_inputs(b=1, V=2, T=2, d=1, n=1, seed=3)
    _, h1, h2 = chimera_scan_naive(**args, return_states=True)
    a = {k: v.reshape(-1) if v.numel() > 1 else v.reshape(()) for k, v in args.items()}
    x, dt1, dt2 = (args[k].reshape(2, 2) for k in ("x", "dt1", "dt2"))
    B1, B2 = (args[k].reshape(2, 2) for k in ("B1", "B2"))
    A1, A2, A3, A4 = (a[k] for k in ("A1", "A2", "A3", "A4"))
    H1, H2 = h1.reshape(2, 2), h2.reshape(2, 2)
    want1 = torch.exp(dt1[1, 1] * A1) * H1[1, 0] + dt1[1, 1] * (A2 * H2[1, 0] + B1[1, 1] * x[1, 1])
    want2 = torch.exp(dt2[1, 1] * A4) * H2[0, 1] + dt2[1, 1] * (A3 * H1[0, 1] + B2[1, 1] * x[1, 1])
    torch.testing.assert_close(H1[1, 1], want1)
    torch.testing.assert_close(H2[1, 1], want2)
    torch.testing.assert_close(H1[0, 0], dt1[0, 0] * B1[0, 0] * x[0, 0])  # zero boundary states


def test_gradients_of_the_fast_path_equal_the_loop():
    args = scan_inputs(b=1, V=3, T=5, d=4, n=2, groups=2, seed=1)
    for name in args:
        args[name].requires_grad_(True)
    w = torch.randn(1, 3, 5, 4, dtype=torch.float64)
    grads_ref = torch.autograd.grad((chimera_scan_naive(**args) * w).sum(), list(args.values()))
    grads = torch.autograd.grad((chimera_scan(**args) * w).sum(), list(args.values()))
    for name, g, g_ref in zip(args, grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10, msg=name)


def test_gradcheck_of_the_fast_path():
    args = scan_inputs(b=1, V=2, T=3, d=2, n=2, seed=2)
    names = list(args)
    for name in names:
        args[name].requires_grad_(True)
    assert torch.autograd.gradcheck(lambda *t: chimera_scan(**dict(zip(names, t))), tuple(args.values()))


def test_one_variate_without_coupling_is_the_selective_scan():
    # V = 1 and A2 = 0: h1 is Mamba's recurrence along time; y = C1 h1 + C2 h2 + D x with h2 = dt2 B2 x.
    args = scan_inputs(b=2, V=1, T=9, d=3, n=4, seed=4)
    args["A2"] = torch.zeros_like(args["A2"])
    y = chimera_scan(**args)
    x, dt1 = args["x"][:, 0], args["dt1"][:, 0]
    y1 = selective_scan_naive(x, dt1, args["A1"], args["B1"][:, 0], args["C1"][:, 0], D=args["D"])
    h2 = args["dt2"][:, 0, :, :, None] * args["B2"][:, 0, :, None, :] * x[..., None]
    torch.testing.assert_close(y[:, 0], y1 + (h2 * args["C2"][:, 0, :, None, :]).sum(-1))


def test_float32_inputs_give_float32_and_match():
    args = scan_inputs(dtype=torch.float32, seed=5)
    y = chimera_scan(**args)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, chimera_scan_naive(**args), rtol=1e-4, atol=1e-4)


def test_scan_errors_say_what_was_expected():
    args = scan_inputs()
    with pytest.raises(ValueError, match=r"chimera_scan: expected x of shape \(batch, variates, time, dim\), got \(2, 3, 7\)"):
        chimera_scan(**{**args, "x": args["x"][..., 0]})
    with pytest.raises(ValueError, match=r"expected A2 of shape \(6, 3\), got \(6, 2\)"):
        chimera_scan(**{**args, "A2": args["A2"][:, :2]})
    with pytest.raises(ValueError, match=r"expected dt2 of shape \(2, 3, 7, 6\), got \(2, 3, 6, 6\)"):
        chimera_scan_naive(**{**args, "dt2": args["dt2"][:, :, :6]})
    with pytest.raises(ValueError, match=r"groups dividing dim=6 .* got \(2, 3, 7, 4, 3\)"):
        bad = torch.zeros(2, 3, 7, 4, 3, dtype=torch.float64)
        chimera_scan(**{**args, "B1": bad, "B2": bad, "C1": bad, "C2": bad})
    with pytest.raises(ValueError, match=r"expected D of shape \(6,\)"):
        chimera_scan(**{**args, "D": args["D"][:2]})
    with pytest.raises(ValueError, match="floating-point x"):
        chimera_scan(**{**args, "x": torch.zeros(2, 3, 7, 6, dtype=torch.long)})


def test_backward_head_is_the_forward_recurrence_on_flipped_variates():
    torch.manual_seed(0)
    fwd = Chimera2DHead(8, 2, 1).double()
    bwd = Chimera2DHead(8, 2, 1, reverse=True).double()
    bwd.load_state_dict(fwd.state_dict())
    u = torch.randn(2, 4, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(bwd(u), fwd(u.flip(1)).flip(1))


def test_model_with_the_naive_scan_matches_the_default():
    torch.manual_seed(0)
    model = Chimera(seq_len=12, pred_len=5, d_model=16, d_state=3, e_layers=2, patch_len=1).double().eval()
    x = torch.randn(2, 12, 3, dtype=torch.float64)
    torch.testing.assert_close(model(x), model(x, scan=chimera_scan_naive), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("patch_len", [1, 5])
def test_forecaster_shapes_and_head(patch_len):
    torch.manual_seed(0)
    model = Chimera(seq_len=12, pred_len=5, d_model=16, d_state=2, e_layers=1, patch_len=patch_len)
    x = torch.randn(2, 12, 3)
    out = model(x)
    assert out.shape == (2, 5, 3) and torch.isfinite(out).all()
    cells = model.forward_features(x)
    assert cells.shape == (2, 3, -(-12 // patch_len), 16)
    assert model.forward_head(cells, pre_logits=True).shape == (2, 3, -(-12 // patch_len) * 16)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.reset_classifier(7)
    assert model(x).shape == (2, 7, 3) and model.num_classes == 7
    # The timestamp features the pipelines pass are accepted and not read.
    assert model(x, x_mark=torch.randn(2, 12, 4)).shape == (2, 7, 3)


def test_forecaster_is_causal_in_no_direction_it_should_not_be():
    # Every variate's forecast reads every other variate (both variate directions) and the whole window.
    torch.manual_seed(0)
    model = Chimera(seq_len=10, pred_len=4, d_model=16, d_state=2, e_layers=1, dropout=0.0, use_norm=False).eval()
    x = torch.randn(1, 10, 3, requires_grad=True)
    model(x)[0, :, 1].sum().backward()
    assert (x.grad[0, 0].abs() > 0).all() and (x.grad[0, :, 0].abs() > 0).all() and (x.grad[0, :, 2].abs() > 0).all()


def test_classifier_shapes():
    torch.manual_seed(0)
    clf = ChimeraClassifier(seq_len=20, num_classes=3, d_model=16, d_state=2, e_layers=1)
    x = torch.randn(4, 20, 2)
    assert clf(x).shape == (4, 3)
    assert clf.forward_head(clf.forward_features(x), pre_logits=True).shape == (4, 16)
    clf.reset_classifier(0)
    assert clf(x).shape == (4, 16)


def test_model_errors_say_what_was_expected():
    model = Chimera(seq_len=12, pred_len=5, enc_in=3, d_model=16, d_state=2, e_layers=1)
    with pytest.raises(ValueError, match=r"Chimera: expected input of shape \(batch, 12, 3\), got \(2, 11, 3\)"):
        model(torch.randn(2, 11, 3))
    with pytest.raises(ValueError, match=r"expected input of shape \(batch, 12, 3\), got \(2, 12, 4\)"):
        model(torch.randn(2, 12, 4))
    with pytest.raises(ValueError, match="floating-point series, got torch.int64"):
        model(torch.zeros(2, 12, 3, dtype=torch.long))
    clf = ChimeraClassifier(seq_len=20, num_classes=3, d_model=16, d_state=2, e_layers=1)
    with pytest.raises(ValueError, match=r"ChimeraClassifier: expected input of shape \(batch, 20, n_variates\)"):
        clf(torch.randn(2, 20))
    for kwargs, message in (
        (dict(e_layers=0), "Chimera: e_layers must be an integer >= 1, got 0"),
        (dict(patch_len=0), "Chimera: patch_len must be an integer >= 1, got 0"),
        (dict(expand=0), "Chimera: expand must be a number > 0, got 0"),
        (dict(dropout=1.0), "Chimera: dropout must be"),
        (dict(d_model=15, expand=1), "inner width 15 must be a multiple of the number of heads 2"),
        (dict(enc_in=0), "Chimera: enc_in must be an integer >= 1 or None, got 0"),
    ):
        with pytest.raises(ValueError, match=message):
            Chimera(**{**dict(seq_len=12, pred_len=5, d_model=16, d_state=2, e_layers=1), **kwargs})
    with pytest.raises(ValueError, match="ChimeraClassifier: num_classes must be an integer >= 0, got -1"):
        ChimeraClassifier(seq_len=20, num_classes=-1)


def test_registry_entries():
    assert {"chimera", "chimera_classifier"} <= set(zoo.list_models("chimera*"))
    model = zoo.create_model("chimera", seq_len=24, pred_len=8, d_model=16, d_state=2, e_layers=1, patch_len=4)
    assert isinstance(model, Chimera) and model(torch.randn(2, 24, 3)).shape == (2, 8, 3)
    assert "2406.04320" in model.pretrained_cfg["paper"]
    clf = zoo.create_model("chimera_classifier", seq_len=20, num_classes=3, d_model=16, d_state=2, e_layers=1)
    assert isinstance(clf, ChimeraClassifier) and clf(torch.randn(2, 20, 2)).shape == (2, 3)
    with pytest.raises(ValueError, match="chimera"):
        zoo.create_model("chimeraa")


def test_forecasting_pipeline_runs_chimera(tmp_path):
    from zoo.data.timeseries import make_forecast_data
    from zoo.tasks.forecasting import BENCH_MODELS, build_forecaster, run_forecast_benchmark

    assert "chimera" in BENCH_MODELS
    assert isinstance(build_forecaster("chimera", 24, 6, d_model=16, d_state=2, chimera_patch_len=4), Chimera)
    rng = np.random.default_rng(0)
    t = np.arange(300)
    values = np.stack([np.sin(2 * np.pi * t / 12), np.cos(2 * np.pi * t / 12)], 1) + 0.05 * rng.standard_normal((300, 2))
    data = make_forecast_data(values.astype(np.float32), 24, 6, name="synthetic", period=12)
    result = run_forecast_benchmark(
        data=data, models=["naive", "chimera"], epochs=2, steps_per_epoch=6, batch_size=16, lr=3e-3, d_model=16,
        d_state=2, e_layers=1, chimera_patch_len=4, progress=False, output=str(tmp_path / "r.json"),
    )
    rows = {r["model"]: r for r in result["rows"]}
    assert result["settings"]["chimera_patch_len"] == 4 and rows["chimera"]["epochs_run"] == 2
    assert rows["chimera"]["test_mse"] < rows["naive"]["test_mse"]


def test_forecast_cli_takes_chimera():
    import argparse

    from zoo.tasks.forecasting import add_cli

    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["forecast", "bench", "--models", "smamba", "chimera", "--chimera-patch-len", "4"])
    assert args.models == ["smamba", "chimera"] and args.chimera_patch_len == 4


def test_classification_pipeline_runs_chimera(tmp_path):
    from zoo.tasks.ts_classification import TSC_MODELS, build_classifier, run_tsc_benchmark

    assert "chimera_classifier" in TSC_MODELS
    assert isinstance(build_classifier("chimera_classifier", 24, 2, d_model=8, d_state=2), ChimeraClassifier)
    with pytest.raises(ValueError, match="unknown classifiers"):
        run_tsc_benchmark("ItalyPowerDemand", models=["nope"])
    pytest.importorskip("aeon", reason="aeon (the timeseries extra) is not installed")
    result = run_tsc_benchmark("ItalyPowerDemand", seeds=[0], epochs=1, d_model=8, d_state=2, e_layers=1, patch_len=6,
                               models=["chimera_classifier"], progress=False)
    assert [r["model"] for r in result["rows"]] == ["1nn_euclidean", "chimera_classifier"]
    assert 0.0 <= result["rows"][1]["test_acc_mean"] <= 1.0
