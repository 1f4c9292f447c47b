"""Speech encoders: front end, padding invariance, streaming, CTC utilities, the synthesized corpus."""
import json

import pytest
import torch

import zoo
from zoo.models.speech.mamba_asr import SpecAugment, SpeechFrontend, ctc_greedy_decode
from zoo.tasks.speech import edit_distance


def tiny(name, **kw):
    return zoo.create_model(name, **{"depth": 2, **kw}).eval()


def padded_batch(lengths, total):
    waves = [torch.randn(n) for n in lengths]
    batch = torch.zeros(len(waves), total)
    for i, w in enumerate(waves):
        batch[i, : w.shape[0]] = w
    return waves, batch, torch.tensor(lengths)


def test_frontend_frames_and_bins():
    fe = SpeechFrontend(n_mels=80)
    feats, frames = fe(torch.randn(2, 16000), torch.tensor([16000, 8000]))
    # 25 ms windows every 10 ms, no padding at the edges (Kaldi's snip_edges)
    assert feats.shape == (2, 98, 80) and frames.tolist() == [98, 48]
    assert feats[1, 48:].abs().max() == 0
    torch.testing.assert_close(feats[1, :48].mean(0), torch.zeros(80), atol=1e-4, rtol=0)
    logmel, frames2 = SpeechFrontend(kind="logmel")(torch.randn(2, 16000), torch.tensor([16000, 8000]))
    assert logmel.shape == (2, 98, 80) and frames2.tolist() == [98, 48]
    with pytest.raises(ValueError, match="at least 400 samples"):
        fe(torch.randn(1, 100))
    with pytest.raises(ValueError, match=r"expected waveforms \(batch, samples\), got shape \(16000,\)"):
        fe(torch.randn(16000))


def test_spec_augment_masks_only_in_training():
    aug = SpecAugment(freq_masks=2, freq_width=10, time_masks=2, time_width=20)
    x = torch.randn(3, 100, 80) + 5
    aug.eval()
    assert torch.equal(aug(x, torch.tensor([100, 100, 100])), x)
    aug.train()
    torch.manual_seed(0)
    y = aug(x, torch.tensor([100, 100, 100]))
    assert (y == 0).any() and ((y == 0) | (y == x)).all()


@pytest.mark.parametrize(
    "name, kw",
    [("mamba_kws_tiny", {}), ("mamba_ctc_causal_tiny", {}),
     ("conmamba_ctc_large", dict(d_model=32, d_ffn=64, num_classes=7, kernel_size=7))],
)
def test_padding_does_not_change_the_unpadded_part(name, kw):
    torch.manual_seed(0)
    model = tiny(name, **kw)
    waves, batch, lengths = padded_batch([4000, 5617, 7001], 9000)
    out = model(batch, lengths)
    for i, w in enumerate(waves):
        alone = model(w[None])
        if isinstance(out, tuple):  # CTC: (log-probs, frames)
            n = int(out[1][i])
            assert n == alone[0].shape[1]
            torch.testing.assert_close(out[0][i, :n], alone[0][0], rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(out[i], alone[0], rtol=1e-5, atol=1e-5)


def test_streaming_equals_full_utterance():
    torch.manual_seed(1)
    model = tiny("mamba_ctc_causal_tiny")
    feats, frames = model.frontend(torch.randn(2, 16000 * 2 // 5 + 240))  # 40 frames
    assert feats.shape[1] % 4 == 0
    full, _ = model.encode(feats, frames)
    state, outs = None, []
    for chunk in torch.split(feats, [4, 8, 16, 12], dim=1):
        y, state = model.forward_stream(chunk, state)
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="needs a causal model"):
        tiny("mamba_kws_tiny").forward_stream(feats)
    with pytest.raises(ValueError, match=r"4k frames"):
        model.forward_stream(feats[:, :6])


def test_published_configuration_size():
    # Mamba-ASR README: ConMamba (CTC) encoder only, 31.6M parameters.
    with torch.device("meta"):
        model = zoo.create_model("conmamba_ctc_large")
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / 1e6 - 31.6) < 0.1, n
    assert model.pretrained_cfg["metrics"]["librispeech_test_clean_wer"] == 3.9


def test_ctc_decode_and_edit_distance():
    lp = torch.full((1, 7, 4), -10.0)
    for t, k in enumerate([0, 2, 2, 0, 2, 3, 3]):
        lp[0, t, k] = 0
    assert ctc_greedy_decode(lp, torch.tensor([7])) == [[2, 2, 3]]
    assert ctc_greedy_decode(lp, torch.tensor([3])) == [[2]]
    assert edit_distance("kitten", "sitting") == 3 and edit_distance([], [1, 2]) == 2


def test_bad_configuration():
    with pytest.raises(ValueError, match="causal=True needs layer_type='mamba'"):
        zoo.create_model("conmamba_ctc_large", causal=True)
    with pytest.raises(ValueError, match="head must be 'ctc' or 'classify', got 'pool'"):
        zoo.create_model("mamba_kws_tiny", head="pool")



@pytest.mark.parametrize("task", ["kws", "digits"])
def test_corpus_and_task_end_to_end(task, tmp_path, espeak):
    from zoo.data.speech import KEYWORDS, SynthSpeech, build_corpus
    from zoo.tasks.speech import run_speech_task

    root = build_corpus(task, tmp_path, voices_per_split=1, n_strings=12, progress=False)
    assert build_corpus(task, tmp_path, voices_per_split=1, n_strings=12, progress=False) == root  # cached
    train, test = SynthSpeech(root, "train", train=True), SynthSpeech(root, "test")
    voices = {s: {it["voice"] for it in d.items} for s, d in (("train", train), ("test", test))}
    assert voices["train"].isdisjoint(voices["test"])  # held-out voices
    wave, label = test[0]
    assert wave.dtype == torch.float32 and wave.shape[0] > 4000
    assert torch.equal(test[0][0], wave)  # evaluation noise is fixed per item
    if task == "kws":
        assert len(train) == len(KEYWORDS) and 0 <= label < len(KEYWORDS)
    res = run_speech_task(task, epochs=1, batch_size=4, cache_dir=str(tmp_path), voices_per_split=1, n_strings=12,
                          limit_batches=2, output=str(tmp_path / "r.json"), progress=False, depth=1,
                          save_weights=str(tmp_path / "w.safetensors"))
    metric = res["accuracy"] if task == "kws" else res["cer"]
    assert 0.0 <= metric <= (1.0 if task == "kws" else 10.0)
    assert json.loads((tmp_path / "r.json").read_text())[("accuracy" if task == "kws" else "cer")] == metric
    # The saved weights load back by name into a fresh model of the same entry (strict: no missing keys).
    import zoo

    reloaded = zoo.create_model(res["model"], depth=1, checkpoint_path=str(tmp_path / "w.safetensors"))
    assert sum(p.numel() for p in reloaded.parameters()) == res["params"]
