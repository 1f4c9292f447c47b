"""benchmarks/long_context.py (issue 23 item 4): the passkey prompt, and a CPU smoke run of the whole benchmark on
tiny random LMs (Mamba-1 with every method and the state diagnostic, Mamba-2, a MemMamba checkpoint)."""
import json
from pathlib import Path

import pytest
import torch
from benchmark_scripts import load_benchmark

import zoo
from zoo.research import long_context as lc
from zoo.research.memmamba import apply_memmamba

bench = load_benchmark("long_context")

TEXT = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; and darkness "
        "was upon the face of the deep. ") * 40


def _encode(text):
    return lc.encode_text(text, "bytes")


def test_passkey_prompt_places_the_key_and_has_the_length():
    filler = _encode(TEXT)
    for depth in (0.0, 0.5, 1.0):
        ids, answer_at = bench.passkey_prompt(filler, 300, "40213", depth, _encode)
        assert ids.numel() == 300 and answer_at.tolist() == list(range(294, 300))
        text = bytes(ids.tolist()).decode()
        assert text.endswith("The pass key is 40213") and text.count("40213") == 3
    fixed = (" The pass key is 00000. Remember it. 00000 is the pass key. ", " What is the pass key? The pass key is", " 00000")
    assert bench.passkey_room(300, 5, _encode) == 300 - sum(len(t) for t in fixed)
    with pytest.raises(ValueError, match="shorter than the needle"):
        bench.passkey_prompt(filler, 50, "40213", 0.5, _encode)


def _run(tmp_path, name, extra):
    (tmp_path / "t.txt").write_text(TEXT)
    out = tmp_path / name
    assert bench.main(["--text", str(tmp_path / "t.txt"), "--train-length", "120", "--multipliers", "1", "2",
                       "--seeds", "0", "1", "--passkey-samples", "2", "--ppl-windows", "1", "--calib-samples", "2",
                       "--out", str(out), *extra]) == 0
    result = json.loads(Path(str(out) + ".json").read_text())
    assert Path(str(out) + ".md").read_text().startswith("| method |") and Path(str(out) + ".png").stat().st_size > 0
    return result


def test_smoke_mamba1_every_method(tmp_path):
    result = _run(tmp_path, "m1", ["--model", "mamba_130m", "--model-kwargs", "d_model=16", "n_layer=2", "vocab_size=256",
                                   'ssm_cfg={"layer": "Mamba1", "d_state": 4}', "--diagnose"])
    assert set(result["summary"]) == set(bench.METHODS) and result["lengths"] == [120, 240]
    assert len(result["rows"]) == len(bench.METHODS) * 2 * 2
    for per in result["summary"].values():
        assert per["240"]["passkey"] is not None and per["240"]["ppl"] > 1  # 120 bytes hold the needle too
    assert set(result["capacity"]["longest_length"]) == set(bench.METHODS)
    assert len(result["state_collapse"]) == 2 and result["state_size"] == 2 * 32 * 4
    # the plain model at the training length: LongMamba leaves it as it is
    plain = [r for r in result["rows"] if r["method"] == "plain" and r["length"] == 120]
    longm = [r for r in result["rows"] if r["method"] == "longmamba" and r["length"] == 120]
    assert [r["ppl"] for r in plain] == pytest.approx([r["ppl"] for r in longm], rel=1e-6)


def test_smoke_mamba2_and_memmamba_checkpoint(tmp_path):
    kwargs = ["d_model=16", "n_layer=2", "vocab_size=256", 'ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 8, "chunk_size": 8}']
    result = _run(tmp_path, "m2", ["--model", "mamba2_130m", "--model-kwargs", *kwargs, "--methods", "plain", "longmamba"])
    assert set(result["summary"]) == {"plain", "longmamba"}
    torch.manual_seed(0)
    model = apply_memmamba(zoo.create_model("mamba2_130m", d_model=16, n_layer=2, vocab_size=256,
                                            ssm_cfg=dict(layer="Mamba2", d_state=8, headdim=8, chunk_size=8)), d_mem=8, chunk=16)
    torch.save(model.state_dict(), tmp_path / "mem.pt")
    result = _run(tmp_path, "mem", ["--model", "mamba2_130m", "--model-kwargs", *kwargs, "--checkpoint", str(tmp_path / "mem.pt"),
                                    "--memmamba", json.dumps(model.memmamba_cfg)])
    assert set(result["summary"]) == {"memmamba"}
