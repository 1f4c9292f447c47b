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


def test_mixer_speed_rows_and_table(tmp_path):
    result = mixers.speed("cpu", img_size=16, batch=2, rounds=1, steps=1)
    assert [r["mixer"] for r in result["rows"]] == list(mixers.MIXERS)
    assert all(r["train_images_per_s"] > 0 and r["params"] > 0 for r in result["rows"])
    run = tmp_path / "result.json"
    run.write_text(json.dumps({"model_kwargs": {"mixer": "hydra"}, "config": {"seed": 0}, "accuracy": 0.5, "params": 10,
                               "train_images_per_s": 30.0, "eval_images_per_s": 100.0, "device": "cpu"}))
    text = mixers.table(result, [str(run)])
    assert "| hydra | 10 | 0.5000 (0.5000) | 30 / 100 (cpu) |" in text and "| bimamba | - | not run | - |" in text
