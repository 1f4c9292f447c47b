"""Speech enhancement: MambAttention and the plain TF-Mamba baseline, the noisy corpus, metrics and `zoo speech enhance*`."""
import json

import pytest
import torch

import zoo
from zoo.models.speech.mambattention import MambAttention, SharedAttention, anti_wrap, enhancement_loss


def small(**kw):
    return MambAttention(**{**dict(hid_feature=8, num_blocks=1, num_heads=2, expand=1, n_fft=64, hop_length=16,
                                   win_length=64, dense_depth=2), **kw})



def test_entries_and_the_paper_size():
    with torch.device("meta"):
        paper, base = zoo.create_model("mambattention"), zoo.create_model("mamba_se")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # One attention module per block, shared by the time and the frequency pass: the only difference.
    attn = sum(count(b.attention) for b in paper.blocks)
    assert attn == 4 * (64 * 3 * 64 + 3 * 64 + 64 * 64 + 64 + 2 * 64)
    assert count(paper) - count(base) == attn
    assert all(b.attention is None for b in base.blocks)
    assert 2.2e6 < count(paper) < 2.4e6  # the paper reports 2.33M
    assert (paper.n_fft, paper.hop_length, paper.num_freqs, len(paper.blocks)) == (400, 100, 201, 4)
    assert zoo.create_model("mambattention_tiny").attention and not zoo.create_model("mamba_se_tiny").attention


def test_attention_is_shared_across_time_and_frequency(monkeypatch):
    torch.manual_seed(0)
    model = small(num_blocks=1).eval()
    calls = []
    monkeypatch.setattr(SharedAttention, "forward", lambda self, x: calls.append((id(self), x.shape)) or torch.zeros_like(x))
    model(torch.randn(1, 800))
    (a, time_shape), (b, freq_shape) = calls
    assert a == b  # the same module, once along time and once along frequency
    frames, bins = 800 // 16 + 1, (33 - 3) // 2 + 1
    assert time_shape == (bins, frames, 8) and freq_shape == (frames, bins, 8)


@pytest.mark.parametrize("n_fft", [64, 66])
def test_shapes_round_trip_and_levels(n_fft):
    torch.manual_seed(0)
    model = small(n_fft=n_fft, win_length=n_fft).eval()
    x = torch.randn(2, 1000)
    mag, pha, com = model.stft(x)
    assert mag.shape == (2, 1000 // 16 + 1, n_fft // 2 + 1) and com.shape == (*mag.shape, 2)
    torch.testing.assert_close(model.istft(mag, pha, 1000), x, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        y = model(x)
        assert y.shape == x.shape and torch.isfinite(y).all()
        # The input is scaled to unit RMS and back: the output follows the input's level. (A power of 2, exact in
        # floating point: the phase of the real-valued DC and Nyquist bins is atan2 of a rounding residue, 0 or +-pi.)
        torch.testing.assert_close(model(4 * x), 4 * y, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match=r"expected waveforms \(batch, samples\)"):
        model(torch.randn(100))


def test_loss_terms_and_gradients():
    torch.manual_seed(0)
    model = small()
    clean = torch.randn(2, 800)
    loss, terms = enhancement_loss(model, clean + 0.3 * torch.randn(2, 800), clean)
    assert set(terms) == {"magnitude", "phase", "complex", "time", "consistency"}
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert float(anti_wrap(torch.tensor(2 * torch.pi + 0.1))) == pytest.approx(0.1, abs=1e-5)


def test_float64_and_bad_configuration():
    model = small().double().eval()
    with torch.no_grad():
        assert model(torch.randn(1, 900, dtype=torch.float64)).dtype == torch.float64
    with pytest.raises(ValueError, match="multiple of num_heads"):
        MambAttention(hid_feature=10, num_heads=4)
    with pytest.raises(ValueError, match="no classifier"):
        zoo.create_model("mamba_se_tiny", num_classes=3)


def test_noise_helpers():
    from zoo.data.speech_enhance import colored_noise, mix_at_snr, room_impulse_response

    g = torch.Generator().manual_seed(0)
    clean = torch.randn(8000, generator=g)
    for exponent in (0.0, 1.0, 2.0):
        noise = colored_noise(8000, exponent, g)
        mixed = mix_at_snr(clean, noise, 7.5)
        snr = 10 * torch.log10(clean.pow(2).mean() / (mixed - clean).pow(2).mean())
        assert float(snr) == pytest.approx(7.5, abs=1e-3)
    # Brown noise has more low-frequency energy than white.
    spec = lambda x: torch.fft.rfft(x).abs().pow(2)  # noqa: E731
    b, w = spec(colored_noise(8000, 2.0, g)), spec(colored_noise(8000, 0.0, g))
    assert b[1:100].sum() / b.sum() > 5 * w[1:100].sum() / w.sum()
    rir = room_impulse_response(g)
    assert float(rir.pow(2).sum()) == pytest.approx(1.0, abs=1e-5) and 4800 <= rir.shape[0] <= 14400


def test_metrics_against_the_reference():
    pytest.importorskip("pesq"), pytest.importorskip("pystoi"), pytest.importorskip("torchmetrics")
    from zoo.tasks.speech_enhance import enhancement_metrics

    g = torch.Generator().manual_seed(0)
    t = torch.arange(16000) / 16000
    clean = torch.sin(2 * torch.pi * 220 * t) * (0.5 + 0.5 * torch.sin(2 * torch.pi * 3 * t)) + 0.05 * torch.randn(16000, generator=g)
    same = enhancement_metrics(clean, clean)
    noisy = enhancement_metrics(clean, clean + 0.5 * torch.randn(16000, generator=g))
    assert same["si_sdr"] > 50 and same["stoi"] > 0.99
    assert noisy["si_sdr"] < same["si_sdr"] and noisy["stoi"] < same["stoi"]


def test_noisy_corpus_cli_train_eval_and_enhance_a_file(tmp_path, capsys, espeak):
    pytest.importorskip("pesq"), pytest.importorskip("pystoi"), pytest.importorskip("torchmetrics")
    import soundfile as sf

    from zoo.cli import main
    from zoo.data.speech import build_corpus
    from zoo.data.speech_enhance import TEST_NOISES, TEST_SNRS, TRAIN_NOISES, TRAIN_SNRS, NoisySpeech

    assert set(TRAIN_NOISES).isdisjoint(TEST_NOISES) and set(TRAIN_SNRS).isdisjoint(TEST_SNRS)
    corpus = dict(n_strings=10, voices_per_split=1)
    root = build_corpus("digits", tmp_path, seed=0, progress=False, **corpus)
    test, test_again = NoisySpeech(root, "test", seed=0), NoisySpeech(root, "test", seed=0)
    noisy, clean, info = test[0]
    assert torch.equal(noisy, test_again[0][0]) and not torch.equal(noisy, NoisySpeech(root, "test", seed=1)[0][0])
    assert info["noise"] in TEST_NOISES and info["snr"] in TEST_SNRS
    train = NoisySpeech(root, "train", train=True, seed=3, segment=4000)
    draws = [train[i % len(train)] for i in range(12)]
    assert all(n.shape == c.shape == (4000,) for n, c, _ in draws)
    assert {d[2]["noise"] for d in draws} <= set(TRAIN_NOISES) and {d[2]["snr"] for d in draws} <= set(TRAIN_SNRS)
    again = NoisySpeech(root, "train", train=True, seed=3, segment=4000)
    assert all(torch.equal(d[0], again[i % len(again)][0]) for i, d in enumerate(draws))  # deterministic from the seed
    with pytest.raises(ValueError, match="unknown noise types"):
        NoisySpeech(root, "train", noise_types=["rain"])

    common = ["--cache-dir", str(tmp_path), "--n-strings", "10", "--voices-per-split", "1", "--eval-limit", "2",
              "--no-progress"]
    weights, out = tmp_path / "w.safetensors", tmp_path / "train.json"
    assert main(["speech", "enhance-train", "--model", "mamba_se_tiny", "--epochs", "1", "--batch-size", "2",
                 "--limit-batches", "2", "--segment", "0.5", "--output", str(out), "--save-weights", str(weights),
                 *common]) == 0
    result = json.loads(out.read_text())
    assert result["model"] == "mamba_se_tiny" and result["steps"] == 2 and result["utterances"] == 2
    assert set(result["by_noise"]) <= set(TEST_NOISES)
    for side in ("noisy", "enhanced"):
        assert set(result[side]) == {"pesq", "stoi", "si_sdr"}
    assert "PESQ" in capsys.readouterr().out

    assert main(["speech", "enhance-eval", "--model", "mamba_se_tiny", "--checkpoint", str(weights),
                 "--output", str(tmp_path / "eval.json"), *common]) == 0
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    for side in ("noisy", "enhanced"):  # the same weights and the same fixed test mixtures
        for k, v in result[side].items():
            assert evaluated[side][k] == pytest.approx(v, rel=1e-4, abs=1e-4)

    wav = tmp_path / "noisy.wav"
    sf.write(wav, (noisy[:6000] * 0.5).numpy(), 8000)  # another rate: resampled in and out
    assert main(["speech", "enhance", str(wav), "--model", "mamba_se_tiny", "--checkpoint", str(weights),
                 "--out", str(tmp_path / "clean.wav")]) == 0
    enhanced, rate = sf.read(tmp_path / "clean.wav")
    assert rate == 8000 and enhanced.shape == (6000,)
    assert main(["speech", "enhance", str(tmp_path / "eval.json"), "--model", "mamba_se_tiny", "--out", str(tmp_path / "x.wav")]) == 2
    assert "could not read" in capsys.readouterr().err
