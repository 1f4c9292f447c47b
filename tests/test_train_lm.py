"""Byte-level LMs on the King James Bible: the corpus loader (whole books held out), the byte tokenizer through
generate and `zoo generate`, and benchmarks/train_lm.py end to end on a small text written here (no Debian file, nothing
downloaded)."""
import json
from pathlib import Path

import pytest
import torch
from benchmark_scripts import load_benchmark

import zoo
from zoo.cli import main as zoo_main
from zoo.data import kjv
from zoo.data.kjv import BOOKS, TEST_BOOKS, VAL_BOOKS, encode_bytes, kjv_splits, load_kjv
from zoo.models.language import ByteTokenizer, MambaLMHeadModel, entry_tokenizer, from_pretrained, load_tokenizer
from zoo.tasks.language_modeling import evaluate_lm, lm_loss, random_windows

REPO = Path(__file__).resolve().parents[1]
WORDS = "and the lord said unto moses behold i will send thee a land of milk and honey thou shalt not fear".split()


def _write_bible(path: Path, verses: int = 3) -> Path:
    """A text in `bible -f`'s format: every book, a few made-up verses each (distinct per book)."""
    g = torch.Generator().manual_seed(0)
    lines = []
    for b, abbrev in enumerate(BOOKS):
        for v in range(1, verses + 1):
            words = [WORDS[int(i)] for i in torch.randint(0, len(WORDS), (12,), generator=g)]
            lines.append(f"{abbrev}{1 + v // 3}:{v} {' '.join(words).capitalize()}, book {b}.")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_books_are_held_out_whole(tmp_path):
    path = _write_bible(tmp_path / "kjv.txt")
    books = load_kjv(path)
    assert list(books) == list(BOOKS.values()) and len(books) == 66
    assert books["Genesis"].count("\n") == 3 and "1:1" not in books["Genesis"]  # references stripped
    splits = kjv_splits(path)
    assert splits.books["test"] == list(TEST_BOOKS) and splits.books["val"] == list(VAL_BOOKS)
    assert len(splits.books["train"]) == 58 and not set(splits.books["train"]) & (set(TEST_BOOKS) | set(VAL_BOOKS))
    assert torch.equal(splits.test, encode_bytes("".join(books[b] for b in TEST_BOOKS)))
    assert torch.equal(splits.val, encode_bytes("".join(books[b] for b in VAL_BOOKS)))
    assert splits.train.numel() + splits.val.numel() + splits.test.numel() == len("".join(books.values()).encode())
    assert splits.summary()["source"] == str(path) and splits.train.dtype == torch.uint8


def test_corpus_errors_name_the_problem(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="apt-get install -y bible-kjv-text bible-kjv"):
        load_kjv(tmp_path / "missing.txt")
    monkeypatch.setattr(kjv.shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="no `bible` program.*bible-kjv-text"):
        load_kjv()
    bad = tmp_path / "bad.txt"
    bad.write_text("Ge1:1 In the beginning\nthis is not a verse\n")
    with pytest.raises(ValueError, match=r"bad.txt, line 2: expected a verse"):
        load_kjv(bad)
    bad.write_text("Ge1:1 In the beginning\nXyz1:1 what\n")
    with pytest.raises(ValueError, match="unknown book 'Xyz'"):
        load_kjv(bad)
    bad.write_text("Exo1:1 Now these\nGe1:1 In the beginning\n")
    with pytest.raises(ValueError, match="book 'Ge' out of order"):
        load_kjv(bad)
    bad.write_text("Ge1:1 In the beginning\n")
    with pytest.raises(ValueError, match="lacks 65 of the 66 books"):
        load_kjv(bad)
    path = _write_bible(tmp_path / "kjv.txt")
    with pytest.raises(ValueError, match="unknown test_books.*'Hezekiah'"):
        kjv_splits(path, test_books=["Hezekiah"])
    with pytest.raises(ValueError, match="books in both test_books and val_books: \\['Ruth'\\]"):
        kjv_splits(path, test_books=["Ruth"])


def test_evaluate_scores_every_byte_once():
    stream = torch.randint(0, 256, (1000,), generator=torch.Generator().manual_seed(0), dtype=torch.int64).to(torch.uint8)
    torch.manual_seed(0)
    model = MambaLMHeadModel(d_model=16, n_layer=1, vocab_size=256).eval()
    out = evaluate_lm(model, stream, 128, batch_size=3)
    assert out["bytes"] == 999 and out["windows"] == 8
    # The same sum by hand: consecutive windows of 128 targets, the last one shorter.
    ids = stream.long()
    with torch.no_grad():
        total = sum(float(lm_loss(model(ids[None, s:min(s + 128, 999)]), ids[None, s + 1:min(s + 129, 1000)], 256, "sum"))
                    for s in range(0, 999, 128))
    assert out["nll"] == pytest.approx(total / 999, rel=1e-5)
    assert out["bpb"] == pytest.approx(out["nll"] / 0.6931471805599453) and out["ppl"] > 1
    x, y = random_windows(stream, 16, 4, torch.Generator().manual_seed(1))
    assert x.shape == y.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    with pytest.raises(ValueError, match="shorter than one window"):
        random_windows(stream[:10], 16, 2, torch.Generator())
    with pytest.raises(ValueError, match="integer token ids"):
        evaluate_lm(model, stream.float(), 16)


def test_byte_tokenizer_and_generation():
    tok = load_tokenizer("bytes")
    assert isinstance(tok, ByteTokenizer) and len(tok) == 256 and tok.eos_token_id is None
    assert tok.encode("Lord é") == [76, 111, 114, 100, 32, 195, 169] and tok.decode(tok.encode("Lord é")) == "Lord é"
    assert tok.decode([195]) == "\ufffd"
    with pytest.raises(ValueError, match=r"ints in \[0, 256\), got \[256\]"):
        tok.decode([256])
    assert entry_tokenizer("mamba_tiny_lm") == entry_tokenizer("mamba2_tiny_lm.kjv") == "bytes"
    assert entry_tokenizer("mamba_130m") is None
    for name in ("mamba_tiny_lm", "mamba2_tiny_lm"):
        model = zoo.create_model(name, d_model=32, n_layer=2).eval()
        assert model.vocab_size == 256 and isinstance(model.tokenizer, ByteTokenizer)
        text = model.generate("In the beginning", max_new_tokens=6)  # no tokenizer argument: the entry's own
        ids = model.generate(list(b"In the beginning"), max_new_tokens=6)
        assert text == bytes(ids).decode("utf-8", errors="replace")
    with torch.device("meta"):
        full = zoo.create_model("mamba_tiny_lm")
    assert 3_000_000 < sum(p.numel() for p in full.parameters()) < 4_000_000


def test_train_lm_end_to_end(tmp_path, capsys):
    """The script on CPU with --tiny and a budget: three models, the same steps, result.json, reloadable weights;
    the Mamba weights package into a tag's file and generate through `zoo generate`."""
    train_lm = load_benchmark("train_lm", "train_lm")
    data = _write_bible(tmp_path / "kjv.txt", verses=6)
    out = tmp_path / "run"
    argv = ["--tiny", "--data", str(data), "--out", str(out), "--threads", "1", "--max-minutes", "5"]
    result = train_lm.main(argv)
    printed = capsys.readouterr().out
    assert "budget:" in printed and "transformer test at 64 bytes" in printed
    saved = json.loads((out / "result.json").read_text())
    assert saved["command"] == "python benchmarks/train_lm.py " + " ".join(argv)
    assert saved["corpus"]["test_books"] == list(TEST_BOOKS) and saved["settings"]["steps_run"] == 3
    assert set(saved["models"]) == {"mamba", "mamba2", "transformer"}
    for name, entry in saved["models"].items():
        assert entry["steps"] == 3 and entry["tokens"] == 3 * 2 * 32
        assert set(entry["test"]) == {"32", "64"}
        test = entry["test"]["32"]
        assert test["bytes"] == saved["corpus"]["test_bytes"] - 1 and test["bpb"] == pytest.approx(test["nll"] / 0.6931471805599453)
        reloaded = from_pretrained(out / name).eval()  # safetensors + mamba-ssm config.json, strict
        assert sum(p.numel() for p in reloaded.parameters()) == entry["params"]
        splits = kjv_splits(data)
        again = evaluate_lm(reloaded, splits.test, 32, batch_size=8)
        assert again["nll"] == pytest.approx(test["nll"], rel=1e-4)
    assert saved["models"]["transformer"]["config"]["attn_layer_idx"] == [0]
    assert result["models"]["mamba"]["entry"] == "mamba_tiny_lm"

    # Packaging (what shipping the tag does): float16 file of the run's weights, loaded into the entry's architecture.
    from zoo.tasks.pretrained import package_weights

    tiny = saved["models"]["mamba"]["config"]
    packed = package_weights(out / "mamba" / "model.safetensors", "mamba_tiny_lm.kjv", out_dir=tmp_path / "weights")
    model = zoo.create_model("mamba_tiny_lm", checkpoint_path=str(packed), d_model=tiny["d_model"],
                             n_layer=tiny["n_layer"]).eval()
    ids = torch.tensor([list(b"And God said")])
    torch.testing.assert_close(model(ids), from_pretrained(out / "mamba").eval()(ids), atol=2e-2, rtol=2e-2)
    capsys.readouterr()
    code = zoo_main(["generate", "mamba_tiny_lm", "--prompt", "And God", "--max-new-tokens", "5", "--checkpoint-path",
                     str(packed), "--model-kwargs", f"d_model={tiny['d_model']}", f"n_layer={tiny['n_layer']}"])
    assert code == 0
    expected = model.generate("And God", max_new_tokens=5)
    assert capsys.readouterr().out == "And God" + expected + "\n"

    with pytest.raises(SystemExit, match="result.json exists"):
        train_lm.main(argv)


def test_train_lm_keeps_the_others_when_one_model_fails(tmp_path, monkeypatch, capsys):
    train_lm = load_benchmark("train_lm", "train_lm")
    data = _write_bible(tmp_path / "kjv.txt")
    monkeypatch.setattr(train_lm, "transformer_config", lambda d, n: dict(d_model=d, n_layer=1, attn_layer_idx=[0],
                                                                          attn_cfg=dict(num_heads=3)))
    out = tmp_path / "run"
    for budget in ([], ["--max-minutes", "5"]):  # the failure found in training, or already in the calibration
        with pytest.raises(SystemExit, match="transformer failed"):
            train_lm.main(["--tiny", "--data", str(data), "--out", str(out), "--models", "mamba2", "transformer",
                           "--sample-bytes", "0", "--overwrite", *budget])
        saved = json.loads((out / "result.json").read_text())
        assert "num_heads=3 must divide embed_dim=32" in saved["models"]["transformer"]["error"]
        assert saved["models"]["mamba2"]["steps"] == 3 and (out / "mamba2" / "model.safetensors").is_file()
    assert "calibrate transformer FAILED" in capsys.readouterr().out


def test_ship_packages_the_mamba_weights_as_tags(tmp_path, capsys):
    """`train_lm.py ship RUN_DIR`: the float16 tag file (loads into the full entry, same logits up to float16), the
    recipe whose train command is the run's, the run's result copied; a --tiny run is refused."""
    import yaml

    train_lm = load_benchmark("train_lm", "train_lm")
    data = _write_bible(tmp_path / "kjv.txt")
    run = tmp_path / "run"
    argv = ["--data", str(data), "--out", str(run), "--models", "mamba", "--steps", "1", "--batch-size", "2",
            "--seq-len", "32", "--eval-lengths", "32", "--sample-bytes", "0", "--threads", "1"]
    train_lm.main(argv)
    root = tmp_path / "repo"
    assert train_lm.ship(run, root=root) == ["mamba_tiny_lm.kjv"]
    printed = capsys.readouterr().out
    packed = root / "zoo" / "weights" / "mamba_tiny_lm.kjv.safetensors"
    from zoo.hub import file_sha256

    assert f'"mamba_tiny_lm.kjv": _byte_cfg("mamba_tiny_lm", file="weights/mamba_tiny_lm.kjv.safetensors",' in printed
    assert f'sha256="{file_sha256(packed)}"' in printed and '"mamba_tiny_lm.kjv": _eval_kjv' in printed
    recipe = yaml.safe_load((root / "configs" / "pretrained" / "mamba_tiny_lm.kjv.yaml").read_text())
    saved = json.loads((root / recipe["train_result"]).read_text())
    assert recipe["train"] == saved["command"] == "python benchmarks/train_lm.py " + " ".join(argv)
    assert recipe["evaluate"] == "zoo pretrained eval mamba_tiny_lm.kjv --output benchmarks/results/pretrained_mamba_tiny_lm.kjv.json"
    model = zoo.create_model("mamba_tiny_lm", checkpoint_path=str(packed)).eval()
    ids = torch.tensor([list(b"And God said")])
    torch.testing.assert_close(model(ids), from_pretrained(run / "mamba").eval()(ids), atol=2e-2, rtol=2e-2)

    tiny = tmp_path / "tiny"
    train_lm.main(["--tiny", "--data", str(data), "--out", str(tiny), "--models", "mamba", "--sample-bytes", "0"])
    with pytest.raises(SystemExit, match="another configuration than mamba_tiny_lm's"):
        train_lm.ship(tiny, root=root)
