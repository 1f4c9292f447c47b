"""benchmarks/token_dynamics.py: the associative-recall generator, the paired summary, one tiny run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from benchmark_scripts import load_benchmark

td = load_benchmark("token_dynamics")
_PATH = Path(td.__file__)


def test_recall_batch_pairs_distinct_keys_with_values_and_asks_one():
    n_pairs, n_keys, n_values = 5, 7, 3
    tokens, labels = td.recall_batch(200, n_pairs, n_keys, n_values, torch.Generator().manual_seed(1))
    assert tokens.shape == (200, 2 * n_pairs + 1) and labels.shape == (200,)
    for row, label in zip(tokens, labels):
        keys, values = row[:-1:2], row[1:-1:2]
        assert len(set(keys.tolist())) == n_pairs and (keys < n_keys).all()
        assert ((values >= n_keys) & (values < n_keys + n_values)).all()
        (where,) = (keys == row[-1]).nonzero(as_tuple=True)
        assert where.numel() == 1 and values[where] - n_keys == label
    assert len(set(labels.tolist())) == n_values  # every value gets asked somewhere in 200 rows
    with pytest.raises(ValueError, match="n_pairs must be in"):
        td.recall_batch(2, 8, 7, 3, torch.Generator())


def test_summary_table_pairs_runs_by_seed():
    runs = [dict(variant=v, seed=s, accuracy=a, divergent=1, convergent=0)
            for v, accs in (("baseline", (0.5, 0.6, 0.7)), ("positive", (0.6, 0.6, 0.9))) for s, a in zip((3, 1, 2), accs)]
    table = td.summary_table(runs, ["baseline", "positive"])
    # differences +10, 0, +20 points: mean +10, std 10, t = 10 / (10 / sqrt 3) = 1.73, higher in 2 of 3
    assert "| positive | 70.00 ± 17.32 | 60.0, 60.0, 90.0 | +10.00 ± 10.00, t = 1.73, 2 of 3 |" in table
    assert "| baseline | 60.00 ± 10.00 | 50.0, 60.0, 70.0 | - |" in table


def test_recall_model_sets_the_skip_and_the_refinement():
    cfg = dict(td.RECALL, d_model=16, depth=2, D_init=-1.0)
    model = td.build_recall_model(td.VARIANTS["mixed"], cfg)
    assert all(torch.equal(layer.D, torch.full_like(layer.D, -1.0)) for layer in model.layers)
    assert all(layer.bc_sign == "mixed" for layer in model.layers)


def test_tabulate_joins_saved_runs(tmp_path, capsys):
    files = []
    for name, variant, accs in (("a", "baseline", (0.5, 0.6)), ("b", "positive", (0.7, 0.6))):
        files.append(tmp_path / f"{name}.json")
        files[-1].write_text(json.dumps(dict(runs=[dict(variant=variant, seed=s, accuracy=a, divergent=1, convergent=0)
                                                   for s, a in enumerate(accs)])))
    assert td.main(["--tabulate", *map(str, files)]) == 0
    assert "| positive | 65.00 ± 7.07 | 70.0, 60.0 | +10.00 ± 14.14, t = 1.00, 1 of 2 |" in capsys.readouterr().out


def test_recall_run_end_to_end(tmp_path):
    out = tmp_path / "recall.json"
    assert td.main(["--task", "recall", "--variants", "baseline", "mixed", "--seeds", "0", "--recall", "steps=3",
                    "n_pairs=3", "n_keys=5", "n_values=4", "d_model=16", "depth=1", "test_size=64", "batch_size=8",
                    "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["recall"]["n_pairs"] == 3 and result["command"].startswith("PYTHONPATH=. python benchmarks/token_dynamics.py --task recall")
    assert [(r["variant"], r["divergent"], r["convergent"]) for r in result["runs"]] == [("baseline", 1, 0), ("mixed", 1, 0)]
    with pytest.raises(SystemExit):
        td.main(["--task", "recall", "--variants", "reorder"])  # not causal


def test_digits_settings_reach_worker_processes(tmp_path):
    """--depth must reach the runs in spawned workers (which re-import the script with its defaults)."""
    import zoo

    out = tmp_path / "digits.json"
    root = _PATH.parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    subprocess.run([sys.executable, str(_PATH), "--variants", "baseline", "--seeds", "0", "1", "--epochs", "1", "--depth", "3",
                    "--jobs", "2", "--out", str(out)], check=True, env=env, cwd=root, capture_output=True)
    expected = sum(q.numel() for q in zoo.create_model("vim_tiny", **dict(td.MODEL_KWARGS, depth=3)).parameters())
    result = json.loads(out.read_text())
    assert result["model_kwargs"]["depth"] == 3 and td.MODEL_KWARGS["depth"] == 2  # the module default is untouched
    assert [r["params"] for r in result["runs"]] == [expected, expected]
