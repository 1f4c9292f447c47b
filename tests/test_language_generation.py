"""Generation (issue 17 item 3): packed prefill + one-step decode give the logits of one full forward over the
concatenated sequence (CPU, float64) for Mamba-1, Mamba-2 and hybrid attention models; a batch of prompts of
different lengths gives each prompt's own tokens; sampling options, stop tokens, streaming, tokenizer, CLI, errors."""
import json

import pytest
import torch

import zoo
from zoo.cli import main
from zoo.models.language import load_tokenizer, sample_next
from zoo.models.language.generation import apply_repetition_penalty

VOCAB = 97  # odd: padded to 104 (Mamba-1) / 112 (Mamba-2); the padding rows are never sampled
KINDS = {
    "mamba1": ("mamba_130m", dict(d_model=32, n_layer=3, d_intermediate=40)),
    "mamba2": ("mamba2_130m", dict(d_model=32, n_layer=3, ssm_cfg=dict(layer="Mamba2", headdim=8, d_state=16, chunk_size=4, ngroups=2))),
    "hybrid": ("mamba2attn_2_7b", dict(d_model=32, n_layer=3, attn_layer_idx=[0, 2],
                                       ssm_cfg=dict(layer="Mamba2", headdim=8, d_state=16, chunk_size=4),
                                       attn_cfg=dict(causal=True, d_conv=4, head_dim=8, num_heads=4, num_heads_kv=2,
                                                     rotary_emb_dim=4, out_proj_bias=False, qkv_proj_bias=False,
                                                     mlp_dim=20))),  # mamba-ssm's MHA option: a gated MLP beside
}


def _model(kind, dtype=torch.float64, **extra):
    name, cfg = KINDS[kind]
    torch.manual_seed(0)
    model = zoo.create_model(name, vocab_size=VOCAB, **cfg, **extra).to(dtype).eval()
    with torch.no_grad():  # larger weights than the init: distinct, confident logits, so greedy paths diverge
        for n, p in model.named_parameters():
            if n.endswith(("A_log", ".D", "dt_bias")):
                p.add_(0.5 * torch.randn_like(p))
            elif p.dim() > 1:
                p.mul_(3)
    return model


PROMPTS = [[5, 17, 3, 80, 2, 41, 9], [11], [60, 61, 62, 7, 1, 1, 1, 1, 30, 22, 96, 0, 4]]


@pytest.mark.parametrize("kind", list(KINDS))
def test_decode_logits_equal_one_full_forward(kind):
    model = _model(kind)
    new = torch.randint(0, VOCAB, (len(PROMPTS), 6), generator=torch.Generator().manual_seed(1))
    logits, cache = model.prefill(PROMPTS, max_new_tokens=new.shape[1])
    steps = [logits]
    for t in range(new.shape[1]):
        steps.append(model.decode_step(new[:, t], cache))
    for i, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            full = model(torch.tensor([prompt + new[i].tolist()]))[0]
        for t, step in enumerate(steps):
            torch.testing.assert_close(step[i], full[len(prompt) - 1 + t], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", list(KINDS))
def test_batch_of_different_lengths_gives_each_prompts_tokens(kind):
    model = _model(kind)
    batched = model.generate(PROMPTS, max_new_tokens=8)
    alone = [model.generate(p, max_new_tokens=8) for p in PROMPTS]
    assert batched == alone
    assert len({tuple(t) for t in batched}) == len(PROMPTS) and all(len(t) == 8 for t in batched)
    # Greedy output is the argmax of the full forward at every step.
    for prompt, tokens in zip(PROMPTS, batched):
        with torch.no_grad():
            full = model(torch.tensor([prompt + tokens]))[0, len(prompt) - 1: -1, :VOCAB]
        assert full.argmax(-1).tolist() == tokens


def test_float32_batching_matches_too():
    model = _model("hybrid", dtype=torch.float32)
    assert model.generate(PROMPTS, max_new_tokens=6) == [model.generate(p, max_new_tokens=6) for p in PROMPTS]


def test_sampling_options():
    model = _model("mamba2")
    greedy = model.generate(PROMPTS, max_new_tokens=6)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert model.generate(PROMPTS, max_new_tokens=6, temperature=0.0, top_k=0) == greedy
    assert model.generate(PROMPTS, max_new_tokens=6, temperature=1.5, top_k=1, generator=g()) == greedy
    # A nucleus smaller than the top token's probability leaves only the top token.
    assert model.generate(PROMPTS, max_new_tokens=6, temperature=1.0, top_k=0, top_p=1e-6, generator=g()) == greedy
    sampled = model.generate(PROMPTS, max_new_tokens=6, temperature=2.0, top_k=0, generator=g())
    assert sampled == model.generate(PROMPTS, max_new_tokens=6, temperature=2.0, top_k=0, generator=g())  # seeded
    assert sampled != greedy
    assert all(0 <= t < VOCAB for seq in sampled for t in seq)


def test_sample_next_respects_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    counts = lambda t: torch.bincount(t, minlength=4).tolist()  # noqa: E731
    top2 = counts(sample_next(logits, 1.0, top_k=2, generator=g))
    assert top2[2] == top2[3] == 0 and abs(top2[0] / 4000 - 0.5 / 0.8) < 0.03
    # top_p 0.7: tokens 0 and 1 (0.5 < 0.7 <= 0.8); 0.85: three tokens.
    assert counts(sample_next(logits, 1.0, top_p=0.7, generator=g))[2:] == [0, 0]
    three = counts(sample_next(logits, 1.0, top_p=0.85, generator=g))
    assert three[3] == 0 and three[2] > 0
    assert torch.equal(sample_next(logits[:3], 0.0), torch.zeros(3, dtype=torch.long))
    seen = torch.tensor([[True, False, True, False]])
    out = apply_repetition_penalty(torch.tensor([[2.0, 2.0, -2.0, -2.0]]), seen, 2.0)
    assert out.tolist() == [[1.0, 2.0, -4.0, -2.0]]


def test_repetition_penalty_changes_greedy_repeats():
    model = _model("mamba1")
    plain = model.generate([5, 5, 5], max_new_tokens=10)
    penalised = model.generate([5, 5, 5], max_new_tokens=10, repetition_penalty=1e6)
    assert len(set(penalised)) == 10 and 5 not in penalised  # every seen token pushed down below the rest
    assert penalised != plain


def test_stop_tokens_and_streamer():
    model = _model("hybrid")
    free = model.generate(PROMPTS, max_new_tokens=8)
    stop = free[0][2]
    streamed = []
    out = model.generate(PROMPTS, max_new_tokens=8, eos_token_id=stop, streamer=lambda i, t: streamed.append((i, t)))
    assert out[0] == free[0][: free[0].index(stop) + 1]  # ends with the stop token, kept
    for i in (1, 2):
        assert out[i] == (free[i][: free[i].index(stop) + 1] if stop in free[i] else free[i])
    for i in range(3):
        assert [t for j, t in streamed if j == i] == out[i]
    assert model.generate(PROMPTS, max_new_tokens=8, stop_token_ids=[stop]) == out


def test_bad_arguments_are_clear_errors():
    model = _model("mamba1")
    cases = [
        (dict(max_new_tokens=0), r"generate: max_new_tokens must be an integer >= 1, got 0"),
        (dict(temperature=-1.0), r"generate: temperature must be a number >= 0, got -1.0"),
        (dict(top_k=2.5), r"generate: top_k must be an integer >= 0, got 2.5"),
        (dict(top_p=0.0), r"generate: top_p must be a number in \(0, 1\], got 0.0"),
        (dict(repetition_penalty=0), r"generate: repetition_penalty must be a number > 0, got 0"),
        (dict(eos_token_id=VOCAB), rf"stop tokens must be token ids in \[0, {VOCAB}\), got \[{VOCAB}\]"),
        (dict(cuda_graph=True), "cuda_graph=True needs the model on a CUDA device, it is on cpu"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            model.generate([1, 2], **kwargs)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 104\).*got ids in \[1, 500\]"):
        model.generate([[1, 2], [500]])
    with pytest.raises(ValueError, match=r"every prompt needs at least one token, got prompt lengths \[2, 0\]"):
        model.generate([[1, 2], []])
    with pytest.raises(ValueError, match="text prompts need a tokenizer"):
        model.generate("hello")
    with pytest.raises(ValueError, match="expected a prompt"):
        model.generate(3.5)
    _, cache = model.prefill([[1, 2]], max_new_tokens=1)
    model.decode_step(torch.tensor([3]), cache)
    with pytest.raises(ValueError, match="the cache is full"):
        model.decode_step(torch.tensor([3]), cache)
    with pytest.raises(ValueError, match=r"expected one token per sequence, shape \(1,\), got \(2,\)"):
        model.decode_step(torch.tensor([3, 4]), cache)


def _tiny_tokenizer(folder):
    """A word-level tokenizer.json over VOCAB tokens (written locally; the tests download nothing)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<|endoftext|>"] + [f"w{i}" for i in range(VOCAB - 1)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def test_text_prompts_through_a_tokenizer(tmp_path):
    tok = load_tokenizer(_tiny_tokenizer(tmp_path))
    assert tok.encode("w4 w7") == [5, 8] and tok.eos_token_id == 0
    model = _model("mamba2")
    text = model.generate(["w4 w7", "w1"], max_new_tokens=4, tokenizer=tok)
    ids = model.generate([[5, 8], [2]], max_new_tokens=4)
    assert text == [tok.decode(t) for t in ids]
    with pytest.raises(FileNotFoundError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "nothing")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="is not a tokenizers tokenizer.json"):
        load_tokenizer(tmp_path / "bad.json")


def test_cli_generate_prints_the_continuation(tmp_path, capsys):
    folder = _tiny_tokenizer(tmp_path / "ckpt")
    model = _model("mamba1", dtype=torch.float32)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    kwargs = ["vocab_size=97", "d_model=32", "n_layer=3", "d_intermediate=40"]
    code = main(["generate", "mamba_130m", "--prompt", "w4 w7", "--max-new-tokens", "5", "--checkpoint-path",
                 str(folder / "pytorch_model.bin"), "--model-kwargs", *kwargs])
    out = capsys.readouterr().out
    assert code == 0
    tokens = model.generate([5, 8], max_new_tokens=5, eos_token_id=0)
    assert len(tokens) == 5 and 0 not in tokens
    # The prompt, then the text of the tokens as they came (a word-level tokenizer has no spaces of its own).
    assert out == "w4 w7" + load_tokenizer(folder).decode(tokens) + "\n"
    for argv, message in [(["--top-p", "0"], "argument --top-p: must be a number in (0, 1], got 0.0"),
                          (["--max-new-tokens", "-2"], "argument --max-new-tokens: must be an integer >= 1, got -2")]:
        with pytest.raises(SystemExit):
            main(["generate", "mamba_130m", "--prompt", "x", *argv])
        assert message in capsys.readouterr().err
    assert main(["generate", "vim_tiny", "--prompt", "w1", "--tokenizer", str(folder)]) == 2
    assert "'vim_tiny' is not a language model (it comes from zoo.models.vision.vim)" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the CUDA-graph decode step")
@pytest.mark.parametrize("kind", list(KINDS))
def test_cuda_graph_decode_equals_eager(kind):
    model = _model(kind, dtype=torch.float32).cuda()
    eager = model.generate(PROMPTS, max_new_tokens=12, cuda_graph=False)
    assert model.generate(PROMPTS, max_new_tokens=12, cuda_graph=True) == eager
    assert model.generate(PROMPTS, max_new_tokens=2, cuda_graph=True) == [t[:2] for t in eager]  # the smallest cache
    # The graph replays on the cache's own tensors: logits of the graphed steps equal the eager steps'.
    from zoo.models.language.generation import _GraphedStep

    tokens = torch.tensor([t[0] for t in eager], device="cuda")
    _, cache_a = model.prefill(PROMPTS, max_new_tokens=3)
    _, cache_b = model.prefill(PROMPTS, max_new_tokens=3)
    step = _GraphedStep(model, cache_b, len(PROMPTS), torch.device("cuda"))
    for _ in range(3):
        torch.testing.assert_close(step(tokens).clone(), model.decode_step(tokens, cache_a), rtol=1e-4, atol=1e-4)


def test_cli_tokenizer_sources(tmp_path):
    """--tokenizer wins; then the file beside --checkpoint-path; then the -hf repository of the tag; then GPT-NeoX's."""
    import argparse

    from zoo.tasks.generate import DEFAULT_TOKENIZER, _tokenizer_source

    folder = _tiny_tokenizer(tmp_path / "ckpt")
    args = lambda **kw: argparse.Namespace(**{"tokenizer": None, "checkpoint_path": None, **kw})  # noqa: E731
    hf_cfg = zoo.model_info("mamba_130m.hf")["pretrained_cfgs"]["mamba_130m.hf"]
    assert _tokenizer_source(args(tokenizer="t.json"), hf_cfg) == "t.json"
    assert _tokenizer_source(args(checkpoint_path=str(folder / "w.bin")), hf_cfg) == str(folder / "tokenizer.json")
    assert _tokenizer_source(args(checkpoint_path=str(tmp_path / "w.bin")), hf_cfg) == DEFAULT_TOKENIZER
    assert _tokenizer_source(args(), hf_cfg) == "hf-hub:state-spaces/mamba-130m-hf/tokenizer.json"
    assert _tokenizer_source(args(), zoo.model_info("mamba_130m")["default_cfg"]) == DEFAULT_TOKENIZER
    # The byte-level entries carry theirs, with or without a checkpoint file; --tokenizer still wins.
    byte_cfg = {"architecture": "mamba_tiny_lm"}
    assert _tokenizer_source(args(checkpoint_path=str(folder / "w.bin")), byte_cfg) == "bytes"
    assert _tokenizer_source(args(tokenizer="t.json"), byte_cfg) == "t.json"
