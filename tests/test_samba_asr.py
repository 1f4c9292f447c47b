"""Samba-ASR (Mamba encoder + Mamba decoder with cross-attention) and the sentence task's text utilities."""
import itertools
import math

import pytest
import torch

import zoo
from zoo.models.speech.samba_asr import beam_search


def small(**kw):
    cfg = dict(d_model=32, depth=1, dec_depth=2, num_heads=2, dropout=0.0, spec_augment=False)
    return zoo.create_model("samba_asr_tiny", **{**cfg, **kw})


def test_shapes_and_registry():
    model = small().eval()
    assert model.head_type == "seq2seq" and model.num_classes == 30 and model.sos_eos == 29
    wave, n = torch.randn(2, 8000), torch.tensor([8000, 6000])
    enc, frames = model.forward_features(wave, n)
    assert enc.shape == (2, int(frames.max()), 32) and frames.tolist()[0] > frames.tolist()[1]
    inp, out = model.make_targets([[3, 4, 5], [6]])
    assert inp.tolist() == [[29, 3, 4, 5], [29, 6, 0, 0]] and out.tolist() == [[3, 4, 5, 29], [6, 29, -100, -100]]
    with torch.no_grad():
        assert model(wave, n, inp).shape == (2, 4, 30)
        assert model(wave, n).shape == (2, 1, 30)  # no tokens: the first token's distribution
        assert model.forward_head(model.decode(inp, enc, frames), pre_logits=True).shape == (2, 4, 32)
    loss = model.loss(wave, n, [[3, 4, 5], [6]])
    assert loss.ndim == 0 and torch.isfinite(loss)
    # The auxiliary CTC head (blank + 28 symbols) mixes in with ctc_weight; ctc_weight=0 is cross-entropy alone.
    assert model.ctc_weight == 0.3 and model.ctc_head.out_features == 29
    plain = small(ctc_weight=0.0).eval()
    assert plain.ctc_head is None
    inp, out = plain.make_targets([[3, 4, 5], [6]])
    ce = torch.nn.functional.cross_entropy(plain(wave, n, inp).flatten(0, 1), out.flatten(), ignore_index=-100)
    torch.testing.assert_close(plain.loss(wave, n, [[3, 4, 5], [6]]), ce)
    assert "samba_asr_tiny" in zoo.list_models("samba*")


def test_errors():
    with pytest.raises(ValueError, match="num_classes must be >= 3"):
        small().reset_classifier(0)
    with pytest.raises(ValueError, match=">= 3, got 2"):
        small(num_classes=2)
    with pytest.raises(ValueError, match=r"ctc_weight must be in \[0, 1\), got 1.0"):
        small(ctc_weight=1.0)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        small(num_heads=5)
    model = small().eval()
    enc = torch.randn(2, 5, 32)
    with pytest.raises(ValueError, match=r"tokens must be in \[0, 30\)"):
        model.decode(torch.tensor([[29, 30]] * 2), enc)
    with pytest.raises(ValueError, match="expected tokens"):
        model.decode(torch.tensor([29, 3]), enc)
    with pytest.raises(ValueError, match=r"target symbols must be in \[1, 28\]"):
        model.make_targets([[3, 29]])
    with pytest.raises(ValueError, match="expected waveforms"):
        model.greedy_decode(torch.randn(8000))
    with pytest.raises(ValueError, match="beam must be >= 1"):
        model.beam_decode(torch.randn(1, 8000), beam=0)


def test_incremental_decoding_equals_teacher_forcing_float64():
    """The decode step with carried Mamba state (and cached cross-attention keys / values) gives the teacher-forced
    pass's log-probabilities, position by position; padding after a shorter target changes nothing before it."""
    torch.manual_seed(0)
    model = small().double().eval()
    wave, n = torch.randn(2, 8000, dtype=torch.float64), torch.tensor([8000, 5000])
    inp, _ = model.make_targets([[3, 4, 5, 6, 7, 8], [9, 10]])
    with torch.no_grad():
        enc, frames = model.forward_features(wave, n)
        full = model.forward_head(model.decode(inp, enc, frames)).log_softmax(-1)
        state = model.init_decoder(enc, frames)
        steps = []
        for t in range(inp.shape[1]):
            lp, state = model.decode_step(inp[:, t], state)
            steps.append(lp)
        alone = model.forward_head(model.decode(inp[1:, :3], enc[1:, : int(frames[1])])).log_softmax(-1)
    assert steps[0].dtype == torch.float64
    torch.testing.assert_close(torch.stack(steps, 1), full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(full[1, :3], alone[0], rtol=1e-10, atol=1e-10)


def test_beam_one_is_greedy():
    torch.manual_seed(1)
    model = small().eval()
    wave, n = torch.randn(3, 8000), torch.tensor([8000, 7000, 4000])
    greedy = model.greedy_decode(wave, n, max_len=15)
    assert model.beam_decode(wave, n, beam=1, max_len=15) == greedy
    assert model.transcribe(wave, n, max_len=15) == greedy
    wide = model.beam_decode(wave, n, beam=3, max_len=15)
    assert len(wide) == 3 and all(all(1 <= t < 29 for t in seq) for seq in wide)


# A hand-made decoder over symbols a=1, b=2 (0 unused, 3 = start/end): the probabilities depend on the prefix.
_TABLE = {(): [0.0, 0.6, 0.4, 1e-6], (1,): [0.0, 0.4, 0.3, 0.3], (1, 1): [0.0, 0.01, 0.01, 0.98], (2,): [0.0, 0.005, 0.005, 0.99]}


def _probs(prefix):
    return _TABLE.get(tuple(prefix), [0.0, 0.25, 0.25, 0.5])


def _step(tokens, state):
    state = torch.cat([state, tokens[:, None]], 1)
    rows = [[math.log(p) if p > 0 else -1e9 for p in _probs(row[1:])] for row in state.tolist()]
    return torch.tensor(rows, dtype=torch.float64), state


def _score(seq, ended, max_len):
    lp = sum(math.log(_probs(seq[:i])[t]) for i, t in enumerate(seq))
    if ended:
        return (lp + math.log(_probs(seq)[3])) / (len(seq) + 1)
    return lp / max_len


def test_beam_search_finds_the_best_hypothesis_of_a_hand_made_decoder():
    """Greedy takes a (0.6) then a then the end: mean log-probability -0.48; the best sequence is b then the end
    (-0.46), which a beam of 2 finds. Checked against every sequence up to the length limit."""
    sos = eos = 3
    start = torch.zeros(1, 0, dtype=torch.long)  # the prefix fed so far (the start token comes first)
    max_len = 4
    assert beam_search(_step, start, sos, eos, beam=1, max_len=max_len) == [1, 1]  # greedy
    every = [(list(s), True) for k in range(max_len) for s in itertools.product([1, 2], repeat=k)]
    every += [(list(s), False) for s in itertools.product([1, 2], repeat=max_len)]
    best = max(every, key=lambda e: _score(e[0], e[1], max_len))[0]
    assert best == [2]
    for beam in (2, 3, 4):
        assert beam_search(_step, start, sos, eos, beam=beam, max_len=max_len) == best
    # Without length normalisation (length_penalty 0) the sum of log-probabilities decides.
    raw = max(every, key=lambda e: _score(e[0], e[1], max_len) * (len(e[0]) + 1 if e[1] else max_len))[0]
    assert beam_search(_step, start, sos, eos, beam=4, max_len=max_len, length_penalty=0.0) == raw


def test_tiny_overfit():
    """The encoder-decoder fits 8 synthetic tone utterances (4 'words') with cross-entropy in a few seconds and
    decodes them exactly, greedily and with a beam."""
    from tests.test_speech import synthetic_utterances

    torch.manual_seed(0)
    waves, lengths, labels = synthetic_utterances()
    model = small(num_classes=6, depth=1, dec_depth=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(120):
        loss = model.loss(waves, lengths, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert loss.item() < 0.1
    assert model.greedy_decode(waves, lengths) == labels
    assert model.beam_decode(waves, lengths, beam=3) == labels


def test_sentence_texts_and_reverb():
    from zoo.data.speech import CHARS, add_reverb, make_sentences, text_to_tokens, texts_to_targets, tokens_to_text

    texts = make_sentences(200, seed=3)
    assert texts == make_sentences(200, seed=3) and texts != make_sentences(200, seed=4)
    assert all(set(t) <= set(CHARS) and t == t.strip() for t in texts)
    assert any("'" in t for t in texts) and any(" " not in t for t in texts) and max(len(t.split()) for t in texts) <= 7
    assert tokens_to_text(text_to_tokens("it's a dog")) == "it's a dog" and text_to_tokens("a b") == [3, 1, 4]
    targets, lengths = texts_to_targets(["ab", "c"])
    assert targets.tolist() == [3, 4, 5] and lengths.tolist() == [2, 1]
    with pytest.raises(ValueError, match=r"characters \['!', 'A'\] are not in the sentence alphabet"):
        text_to_tokens("A dog!")
    wave = torch.randn(8000)
    wet = add_reverb(wave, 0.3, torch.Generator().manual_seed(0))
    assert wet.shape == wave.shape and torch.allclose(wet.pow(2).mean(), wave.pow(2).mean(), rtol=1e-4)
    assert not torch.allclose(wet, wave)


def test_transcribe_cli_with_a_samba_checkpoint(tmp_path, capsys):
    """`zoo speech transcribe FILE --model samba_asr_tiny --checkpoint W [--beam K]` on a sentence model (30
    classes, characters) and a digits model (12 classes, read from the file's head)."""
    import soundfile as sf

    from zoo.cli import main
    from zoo.hub import save_state_dict

    sf.write(tmp_path / "a.wav", (0.1 * torch.randn(12000)).numpy(), 16000)
    for classes in (30, 12):
        torch.manual_seed(0)
        save_state_dict(zoo.create_model("samba_asr_tiny", num_classes=classes), str(tmp_path / "w.safetensors"))
        args = ["speech", "transcribe", str(tmp_path / "a.wav"), "--model", "samba_asr_tiny",
                "--checkpoint", str(tmp_path / "w.safetensors")]
        assert main(args) == 0
        text = capsys.readouterr().out.strip().splitlines()[-1]
        assert set(text) <= set(" 'abcdefghijklmnopqrstuvwxyz" if classes == 30 else "0123456789")
        assert main(args + ["--beam", "2"]) == 0
        assert main(args + ["--stream"]) == 2  # streaming is for causal CTC models


def test_sentence_task_end_to_end(tmp_path, espeak):
    from zoo.data.speech import SynthSpeech, build_corpus
    from zoo.tasks.speech import run_speech_task

    root = build_corpus("sentences", tmp_path, voices_per_split=1, n_strings=10, progress=False)
    test = SynthSpeech(root, "test", reverb=1.0)
    assert all(it["label"] == it["text"] for it in test.items)
    assert torch.equal(test[0][0], test[0][0])  # evaluation noise and reverberation fixed per item
    for name in ("mamba_ctc_tiny", "samba_asr_tiny"):
        res = run_speech_task("sentences", name, epochs=1, batch_size=4, cache_dir=str(tmp_path), voices_per_split=1,
                              n_strings=10, limit_batches=1, progress=False, depth=1, reverb=0.5,
                              beam=2 if name == "samba_asr_tiny" else 1)
        assert res["cer"] >= 0 and res["wer"] >= 0 and len(res["examples"]) == 2
        assert ("beam" in res) == (name == "samba_asr_tiny")
    with pytest.raises(ValueError, match="beam search .* is for encoder-decoder entries"):
        run_speech_task("sentences", "mamba_ctc_tiny", epochs=1, cache_dir=str(tmp_path), voices_per_split=1,
                        n_strings=10, progress=False, beam=2)
