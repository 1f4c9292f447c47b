"""Long-context methods on the LM entries (issue 23): LongMamba's token filtering against running the plain scan on
the kept tokens only, calibration, the identity cases; Stuffed Mamba's state statistics, forget-more and state
normalisation against the mixers' own streaming and parameters; state capacity. CPU, float64, small random LMs."""
import copy

import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.core.mamba import Mamba
from zoo.core.mamba2 import Mamba2
from zoo.core.selective_scan import selective_scan
from zoo.core.selective_scan.naive import selective_scan_naive
from zoo.core.ssd import ssd_scan
from zoo.core.ssd.naive import ssd_scan_naive
from zoo.research import long_context as lc

SMALL = {
    "mamba_130m": dict(d_model=16, n_layer=2, vocab_size=40, ssm_cfg=dict(layer="Mamba1", d_state=4)),
    "mamba2_130m": dict(d_model=16, n_layer=2, vocab_size=40, ssm_cfg=dict(layer="Mamba2", d_state=8, headdim=8, chunk_size=8)),
}


def _lm(name, **kw):
    torch.manual_seed(0)
    return zoo.create_model(name, **{**SMALL[name], **kw}).double().eval()


def _ids(n, length, seed=0):
    return torch.randint(0, 40, (n, length), generator=torch.Generator().manual_seed(seed))


# --- LongMamba ------------------------------------------------------------------------------------------------

def _reference_filtered_mamba1(u, delta, A, B, C, D, z, keep):
    """Each channel on its own: the plain sequential scan run over that channel's kept tokens only; a dropped
    token's output reads the state after the last kept token before it."""
    b, l, d = u.shape
    out = torch.zeros(b, l, d, dtype=u.dtype)
    for ch in range(d):
        for t in range(l):
            for row in range(b):
                kept = [s for s in range(t + 1) if keep[row, s, ch]]
                if kept:
                    _, h = selective_scan_naive(u[row : row + 1, kept, ch : ch + 1], delta[row : row + 1, kept, ch : ch + 1],
                                                A[ch : ch + 1], B[row : row + 1, kept], C[row : row + 1, kept],
                                                return_last_state=True)
                    y = (h[0, 0] * C[row, t]).sum()
                else:
                    y = torch.zeros((), dtype=u.dtype)
                out[row, t, ch] = (y + D[ch] * u[row, t, ch]) * F.silu(z[row, t, ch])
    return out


def test_longmamba_filtering_equals_the_plain_scan_on_kept_tokens_mamba1():
    torch.manual_seed(0)
    b, l, d, n = 2, 12, 5, 3
    u, raw, z = torch.randn(b, l, d, dtype=torch.float64), torch.randn(b, l, d, dtype=torch.float64), torch.randn(b, l, d, dtype=torch.float64)
    A = -torch.rand(d, n, dtype=torch.float64) - 0.1
    B, C = torch.randn(b, l, n, dtype=torch.float64), torch.randn(b, l, n, dtype=torch.float64)
    D, bias = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    delta = F.softplus(raw + bias)
    glob = torch.tensor([True, False, True, True, False])
    theta = delta.flatten(0, 1).median(0).values  # about half of the tokens dropped in global channels
    hook = lc.LongMambaHook(glob, theta[None], lengths=[l], train_length=l // 2)
    mixer = Mamba(4)  # only its type matters to the hook
    out = hook(mixer, selective_scan, u, raw, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True)
    keep = (delta > theta) | ~glob
    assert 0 < (~keep).sum() < keep.numel()
    torch.testing.assert_close(out, _reference_filtered_mamba1(u, delta, A, B, C, D, z, keep))
    # and with the training length not passed, nothing is filtered: the plain scan
    plain = selective_scan(u, raw, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True)
    hook.train_length = l
    torch.testing.assert_close(hook(mixer, selective_scan, u, raw, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True), plain)


def test_longmamba_filtering_equals_the_plain_scan_on_kept_tokens_mamba2():
    torch.manual_seed(1)
    b, l, h, p, n = 1, 10, 3, 2, 4
    x, raw = torch.randn(b, l, h, p, dtype=torch.float64), torch.randn(b, l, h, dtype=torch.float64)
    A, D, bias = -torch.rand(h, dtype=torch.float64) - 0.1, torch.randn(h, dtype=torch.float64), torch.randn(h, dtype=torch.float64)
    B, C = torch.randn(b, l, 1, n, dtype=torch.float64), torch.randn(b, l, 1, n, dtype=torch.float64)
    dt = F.softplus(raw + bias)
    glob = torch.tensor([True, True, False])
    theta = dt[0].median(0).values
    hook = lc.LongMambaHook(glob, theta[None], lengths=[l], train_length=4)
    out = hook(Mamba2(16, headdim=8, d_state=4), ssd_scan, x, raw, A, B, C, D=D, dt_bias=bias, dt_softplus=True, chunk_size=4)
    keep = (dt > theta) | ~glob
    assert 0 < (~keep).sum() < keep.numel()
    ref = torch.zeros_like(x)
    for head in range(h):
        for t in range(l):
            kept = [s for s in range(t + 1) if keep[0, s, head]]
            state = torch.zeros(1, 1, p, n, dtype=torch.float64)
            if kept:
                _, state = ssd_scan_naive(x[:, kept, head : head + 1], dt[:, kept, head : head + 1], A[head : head + 1],
                                          B[:, kept], C[:, kept])
            ref[0, t, head] = (state[0, 0] * C[0, t, 0]).sum(-1) + D[head] * x[0, t, head]
    torch.testing.assert_close(out, ref)


def test_threshold_keeps_the_training_decay_or_count():
    torch.manual_seed(0)
    delta = torch.rand(3, 16, dtype=torch.float64) + 0.01
    ordered = delta.sort(-1, descending=True).values
    total = delta.sum(-1)
    for length in (32, 64):
        resampled = F.interpolate(ordered[:, None], size=length, mode="linear", align_corners=False)[:, 0]
        theta = lc._threshold(ordered, total, length, 16, "decay")
        kept = resampled > theta[:, None]
        kept_sum = (resampled * kept).sum(-1)
        assert (kept_sum > total).all()  # the kept tokens pass the training length's accumulated Delta ...
        smallest_kept = torch.where(kept, resampled, torch.inf).amin(-1)
        assert (kept_sum - smallest_kept <= total).all()  # ... and one token fewer would not
        theta = lc._threshold(ordered, total, length, 16, "count")
        assert ((resampled > theta[:, None]).sum(-1) == 16).all()


@pytest.mark.parametrize("name", sorted(SMALL))
def test_longmamba_on_lm_entries(name, tmp_path):
    model = _lm(name)
    plain = copy.deepcopy(model)
    cal = lc.calibrate_longmamba(model, _ids(3, 24), lengths=[48, 96])
    assert len(cal["layers"]) == 2 and cal["layers"][0]["thresholds"].shape[0] == 2
    path = lc.save_calibration(cal, tmp_path / "cal.pt")
    long_ids = _ids(2, 96, seed=1)
    # thresholds that keep every token: the plain model, at every length
    keep_all = copy.deepcopy(cal)
    for layer in keep_all["layers"]:
        layer["thresholds"].zero_()
    with torch.no_grad():
        ref = plain(long_ids)
        torch.testing.assert_close(lc.apply_longmamba(model, keep_all, channel_threshold=0.0)(long_ids), ref)
        lc.apply_longmamba(model, path, channel_threshold=0.0)
        torch.testing.assert_close(model(long_ids[:, :24]), plain(long_ids[:, :24]))  # up to L_train: untouched
        filtered = model(long_ids)
        assert torch.isfinite(filtered).all() and not torch.allclose(filtered, ref)
        # no global channel (threshold above every decay): the plain model
        lc.apply_longmamba(model, path, channel_threshold=2.0)
        torch.testing.assert_close(model(long_ids), ref)
        lc.remove_long_context(model)
        torch.testing.assert_close(model(long_ids), ref)
    assert set(model.state_dict()) == set(plain.state_dict())  # no parameter or buffer added


def test_longmamba_packed_sequences_use_each_sequences_length():
    model = _lm("mamba_130m")
    cal = lc.calibrate_longmamba(model, _ids(2, 8), lengths=[16, 32])
    lc.apply_longmamba(model, cal, channel_threshold=0.0)
    a, b = _ids(1, 6, seed=3), _ids(1, 30, seed=4)
    with torch.no_grad():
        packed = model(torch.cat([a, b], 1), cu_seqlens=torch.tensor([0, 6, 36]))
        torch.testing.assert_close(packed[:, :6], model(a))
        torch.testing.assert_close(packed[:, 6:], model(b))


def test_calibrate_command(tmp_path):
    from zoo.models.language import save_pretrained

    save_pretrained(_lm("mamba_130m", vocab_size=256).float(), tmp_path / "lm")
    text = tmp_path / "t.txt"
    text.write_text("In the beginning God created the heaven and the earth. " * 20)
    assert lc.main(["calibrate", "--model", str(tmp_path / "lm"), "--text", str(text), "--tokenizer", "bytes",
                    "--train-length", "32", "--samples", "2", "--multipliers", "2", "4", "--out", str(tmp_path / "cal.pt")]) == 0
    cal = lc.load_calibration(tmp_path / "cal.pt")
    assert cal["lengths"] == [64, 128] and cal["train_length"] == 32
    assert len(lc.load_calibration(str(tmp_path / "cal.pt") + ".statenorm")["layers"]) == 2


# --- Stuffed Mamba -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SMALL))
def test_state_statistics_leave_the_output_and_match_the_streamed_state(name):
    model = _lm(name)
    ids = _ids(2, 40)
    with torch.no_grad():
        ref = model(ids)
        stats = lc.state_statistics(model, ids, every=16)
        torch.testing.assert_close(model(ids), ref)
    assert stats["positions"] == [16, 32, 40]
    # the last statistics are those of the state that streaming the sequence leaves in each layer
    mixer = model.backbone.layers[0].mixer
    with torch.no_grad():
        hidden = model.backbone.layers[0].norm(model.backbone.embedding(ids).to(torch.float64))
        _, (_, state) = mixer.forward_stream(hidden)
    v = state.flatten(2) if isinstance(mixer, Mamba2) else state
    torch.testing.assert_close(stats["layers"][0]["norm"][-1], v.norm(dim=-1).mean(0))
    torch.testing.assert_close(stats["layers"][0]["max"][-1], v.abs().amax(-1).mean(0))
    summary = lc.collapse_summary(stats, train_length=16, top=2)
    assert len(summary) == 2 and len(summary[0]["growth"]) == 2


def test_forget_more_equals_the_rescaled_parameters():
    model = _lm("mamba_130m")
    ids = _ids(2, 20)
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        for block in scaled.backbone.layers:
            m = block.mixer
            m.A_log.add_(torch.log(torch.tensor(1.5, dtype=torch.float64)))  # A * 1.5
            m.x_proj.weight[m.dt_rank : m.dt_rank + m.d_state].mul_(0.5)  # B * 0.5
        torch.testing.assert_close(lc.apply_stuffed_mamba(model, "forget_more_remember_less", A_scale=1.5, B_scale=0.5)(ids),
                                   scaled(ids))
        lc.apply_stuffed_mamba(model, "forget_more_remember_less")
        torch.testing.assert_close(model(ids), lc.remove_long_context(copy.deepcopy(model))(ids))


@pytest.mark.parametrize("cls", [Mamba, Mamba2])
def test_state_normalization_equals_streaming_with_normalised_states(cls):
    torch.manual_seed(0)
    mixer = (cls(16, d_state=4) if cls is Mamba else cls(16, d_state=8, headdim=8, chunk_size=4)).double().eval()
    x = torch.randn(2, 22, 16, dtype=torch.float64)
    channels = mixer.nheads if cls is Mamba2 else mixer.d_inner
    with torch.no_grad():  # limits around the first chunk's state norms: some channels pass them, some not
        _, (_, first) = mixer.forward_stream(x[:, :8])
        limit = (first.flatten(2) if cls is Mamba2 else first).norm(dim=-1).mean(0) * (torch.rand(channels, dtype=torch.float64) + 0.5)
        ref, state = [], None
        for start in range(0, 22, 8):
            y, (conv, ssm) = mixer.forward_stream(x[:, start : start + 8], state=state)
            norm = (ssm.flatten(2) if cls is Mamba2 else ssm).norm(dim=-1)
            assert (norm > limit).any()
            scale = torch.where(norm > limit, limit / norm, torch.ones_like(norm))
            state = (conv, ssm * scale.reshape(scale.shape + (1,) * (ssm.dim() - 2)))
            ref.append(y)
        mixer.scan_hook = lc.StateNormHook(limit, chunk=8)
        torch.testing.assert_close(mixer(x), torch.cat(ref, 1))
        mixer.scan_hook = lc.StateNormHook(torch.full((channels,), 1e9, dtype=torch.float64), chunk=8)
        out = mixer(x)
        mixer.scan_hook = None
        torch.testing.assert_close(out, mixer(x))  # thresholds never reached: the plain mixer


def test_state_norm_calibration_and_apply():
    model = _lm("mamba2_130m")
    cal = lc.calibrate_state_norm(model, _ids(2, 16))
    assert len(cal["layers"]) == 2 and cal["layers"][0]["norm"].shape == (4,)
    ids = _ids(1, 64)
    with torch.no_grad():
        ref = model(ids)
        out = lc.apply_stuffed_mamba(model, "state_normalization", calibration=cal, threshold_multiplier=1e6)(ids)
        torch.testing.assert_close(out, ref)
        out = lc.apply_stuffed_mamba(model, "state_normalization", calibration=cal, chunk=16)(ids)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="method must be one of"):
        lc.apply_stuffed_mamba(model, "state_collapse")


def test_state_capacity_and_size():
    assert lc.state_capacity({64: 1.0, 128: 0.95, 256: 0.5, 512: 0.97}, min_accuracy=0.9) == 128
    assert lc.state_capacity({64: 0.1}) is None
    assert lc.state_size(_lm("mamba_130m")) == 2 * 32 * 4
    assert lc.state_size(_lm("mamba2_130m")) == 2 * 4 * 8 * 8


def test_state_normalization_on_packed_sequences_and_generation():
    model = _lm("mamba2_130m")
    cal = lc.calibrate_state_norm(model, _ids(2, 16))
    lc.apply_stuffed_mamba(model, "state_normalization", calibration=cal, threshold_multiplier=0.5, chunk=8)
    a, b = _ids(1, 13, seed=3), _ids(1, 30, seed=4)
    with torch.no_grad():
        packed = model(torch.cat([a, b], 1), cu_seqlens=torch.tensor([0, 13, 43]))
        torch.testing.assert_close(packed[:, :13], model(a))
        torch.testing.assert_close(packed[:, 13:], model(b))
    assert len(model.generate([a[0].tolist(), b[0].tolist()], max_new_tokens=2)) == 2  # prefill packs the prompts


def test_sliding_window_equals_the_plain_scan_over_each_window():
    torch.manual_seed(0)
    b, l, d, n, r = 2, 23, 4, 3, 6
    u, raw, z = (torch.randn(b, l, d, dtype=torch.float64) for _ in range(3))
    A = -torch.rand(d, n, dtype=torch.float64) - 0.1
    B, C = torch.randn(b, l, n, dtype=torch.float64), torch.randn(b, l, n, dtype=torch.float64)
    D, bias = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    h0 = torch.randn(b, d, n, dtype=torch.float64)
    hook = lc.SlidingWindowHook(r)
    for init in (None, h0):
        out = hook(Mamba(4), selective_scan, u, raw, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True, initial_state=init)
        ref = torch.zeros_like(out)
        for t in range(l):
            lo = max(0, t - r + 1)  # the window (t - r, t]; the initial state counts as position -1 (kept while t - r < -1)
            ys = selective_scan_naive(u[:, lo : t + 1], raw[:, lo : t + 1], A, B[:, lo : t + 1], C[:, lo : t + 1], D=D,
                                      z=z[:, lo : t + 1], delta_bias=bias, delta_softplus=True,
                                      initial_state=init if (init is not None and t < r - 1) else None)
            ref[:, t] = ys[:, -1]
        torch.testing.assert_close(out, ref)


def test_sliding_window_mamba2_and_on_an_lm():
    torch.manual_seed(1)
    b, l, h, p, n, r = 1, 19, 3, 2, 4, 5
    x, raw = torch.randn(b, l, h, p, dtype=torch.float64), torch.randn(b, l, h, dtype=torch.float64)
    A, D, bias = -torch.rand(h, dtype=torch.float64) - 0.1, torch.randn(h, dtype=torch.float64), torch.randn(h, dtype=torch.float64)
    B, C = torch.randn(b, l, 1, n, dtype=torch.float64), torch.randn(b, l, 1, n, dtype=torch.float64)
    out = lc.SlidingWindowHook(r)(Mamba2(16, headdim=8, d_state=4), ssd_scan, x, raw, A, B, C, D=D, dt_bias=bias,
                                            dt_softplus=True, chunk_size=4)
    dt = F.softplus(raw + bias)
    ref = torch.zeros_like(out)
    for t in range(l):
        lo = max(0, t - r + 1)
        ys, _ = ssd_scan_naive(x[:, lo : t + 1], dt[:, lo : t + 1], A, B[:, lo : t + 1], C[:, lo : t + 1], D=D)
        ref[:, t] = ys[:, -1]
    torch.testing.assert_close(out, ref)
    model = _lm("mamba_130m")
    ids = _ids(2, 40)
    with torch.no_grad():
        ref = model(ids)
        long_window = lc.apply_stuffed_mamba(model, "sliding_window", window=64)(ids)  # longer than the input: plain
        torch.testing.assert_close(long_window, ref)
        short = lc.apply_stuffed_mamba(model, "sliding_window", window=8)(ids)
        torch.testing.assert_close(short[:, :8], ref[:, :8])
        assert not torch.allclose(short[:, 8:], ref[:, 8:])


def test_mamba1_rate_choices():
    model = _lm("mamba_130m")
    with torch.no_grad():
        model.backbone.layers[0].mixer.A_log.copy_(torch.log(torch.arange(1, 5, dtype=torch.float64)).repeat(32, 1))
    samples = _ids(1, 16)
    decays = {r: lc.calibrate_longmamba(model, samples, [32], mamba1_rate=r)["layers"][0]["decay"] for r in ("max", "mean", "min")}
    assert (decays["max"] > decays["mean"]).all() and (decays["mean"] > decays["min"]).all()  # A = -1 slowest, -4 fastest
    with pytest.raises(ValueError, match="reduce must be"):
        lc.calibrate_longmamba(model, samples, [32], mamba1_rate="median")


def test_longmamba_threshold_lookup():
    hook = lc.LongMambaHook(torch.ones(2, dtype=torch.bool), torch.tensor([[1.0, 1.0], [2.0, 2.0]]), lengths=[200, 400],
                            train_length=100)
    assert hook.threshold_at(100) is None and hook.threshold_at(140) is None  # nearer the training length
    assert hook.threshold_at(160).tolist() == [1.0, 1.0] and hook.threshold_at(5000).tolist() == [2.0, 2.0]
