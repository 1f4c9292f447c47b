"""benchmarks/parity.py (task generator, model, a short run, the table) and benchmarks/mixers.py (speed rows and
the table of finetune results)."""
import json

import torch
from benchmark_scripts import load_benchmark

parity = load_benchmark("parity")
mixers = load_benchmark("mixers")


def test_parity_batches_are_right_and_padded():
    tokens, lengths, labels = parity.batch(torch.Generator().manual_seed(0), 64, 3, 9, "cpu")
    assert tokens.shape == (64, 9) and lengths.min() >= 3 and lengths.max() <= 9
    for row, n, label in zip(tokens, lengths, labels):
        assert (row[n:] == parity.PAD).all() and (row[:n] != parity.PAD).all()
        assert int(row[:n].sum()) % 2 == int(label)


def test_parity_model_reads_each_string_at_its_own_last_token():
    torch.manual_seed(0)
    for mixer in ("mamba", "mamba2"):
        model = parity.ParityModel(mixer, negative=True).eval()
        tokens, lengths, _ = parity.batch(torch.Generator().manual_seed(1), 4, 3, 12, "cpu")
        with torch.no_grad():
            out = model(tokens, lengths)
            alone = torch.cat([model(tokens[i:i + 1, : lengths[i]], lengths[i:i + 1]) for i in range(4)])
        torch.testing.assert_close(out, alone, rtol=1e-5, atol=1e-5)  # padding after the end changes nothing


def test_parity_run_and_table(tmp_path):
    run = parity.run("mamba2", True, seed=0, steps=2, device="cpu", warmup=1, bs=8)
    assert run["steps"] == 2 and 0 <= run["test_acc_40_256"] <= 1 and run["loss_log"]
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"runs": [run, {**run, "seed": 1, "test_acc_40_256": 1.0}]}))
    text = parity.tabulate([path])
    assert "| mamba2 | (-1, 1) | 2 | 2 |" in text and "1.000" in text


def test_modular_batches_match_python_eval_and_are_padded():
    symbol = {parity.PLUS + i: op for i, op in enumerate(parity.OPERATORS)}
    for lo, hi, seed in ((3, 9, 0), (3, 40, 1), (40, 256, 2)):
        tokens, lengths, values = parity.modular_batch(torch.Generator().manual_seed(seed), 64, lo, hi, "cpu")
        n_lo, n_hi = (lo + 1) // 2 - 1, (hi + 1) // 2 - 1  # numbers per expression, as the reference generator
        assert tokens.shape == (64, 2 * n_hi) and values.min() >= 0 and values.max() < parity.MODULUS
        assert (lengths % 2 == 0).all() and lengths.min() >= 2 * n_lo and lengths.max() <= 2 * n_hi
        for row, n, value in zip(tokens.tolist(), lengths.tolist(), values.tolist()):
            assert row[n - 1] == parity.EQUALS and all(t == parity.MOD_PAD for t in row[n:])
            assert all(0 <= t < parity.MODULUS for t in row[: n - 1 : 2])
            assert all(t in symbol for t in row[1 : n - 1 : 2])
            text = " ".join(str(t) if t < parity.MODULUS else symbol[t] for t in row[: n - 1])
            assert eval(text) % parity.MODULUS == value, text  # Python's precedence: * before + and -


def test_modular_run_and_table(tmp_path):
    run = parity.run("mamba", True, seed=0, steps=2, device="cpu", warmup=1, bs=8, task="modular", d_model=16, eval_n=64)
    assert run["task"] == "modular" and run["depth"] == 2 and run["weight_decay"] == 0.1 and run["loss_log"]
    assert 0 <= run["train_acc_3_40"] <= 1 and 0 <= run["test_acc_40_256"] <= 1
    model = parity.ParityModel("mamba2", True, 16, 2, parity.MOD_VOCAB, parity.MODULUS)
    tokens, lengths, _ = parity.modular_batch(torch.Generator().manual_seed(0), 3, 3, 20, "cpu")
    assert model(tokens, lengths).shape == (3, parity.MODULUS)
    path = tmp_path / "r.json"
    old = {k: v for k, v in run.items() if k != "task"}  # a result written before --task: a parity run
    path.write_text(json.dumps({"runs": [run, {**old, "mixer": "mamba2"}]}))
    text = parity.tabulate([path])
    assert "| modular | mamba | (-1, 1) | 2 | 1 |" in text and "| parity | mamba2 | (-1, 1) | 2 | 1 |" in text


def test_mixer_speed_rows_and_table(tmp_path):
    result = mixers.speed("cpu", img_size=16, batch=2, rounds=1, steps=1)
    assert [r["mixer"] for r in result["rows"]] == list(mixers.MIXERS)
    assert all(r["train_images_per_s"] > 0 and r["params"] > 0 for r in result["rows"])
    run = tmp_path / "result.json"
    run.write_text(json.dumps({"model_kwargs": {"mixer": "hydra"}, "config": {"seed": 0}, "accuracy": 0.5, "params": 10,
                               "train_images_per_s": 30.0, "eval_images_per_s": 100.0, "device": "cpu"}))
    text = mixers.table(result, [str(run)])
    assert "| hydra | 10 | 0.5000 (0.5000) | 30 / 100 (cpu) |" in text and "| bimamba | - | not run | - |" in text
