"""benchmarks/lm_generation.py (issue 17 item 4) runs end to end on a tiny model on the CPU (the GPU run is the
benchmark itself, not a test): every point, zoo and transformers, in the JSON it writes."""
import json

import pytest
from benchmark_scripts import load_benchmark

pytest.importorskip("transformers")


def test_lm_generation_benchmark_smoke(tmp_path):
    bench = load_benchmark("lm_generation", "lm_generation")
    out_file = tmp_path / "out.json"
    bench.main(["--model", "mamba_130m", "--model-kwargs", "d_model=32", "n_layer=2", "--device", "cpu", "--dtype", "float32",
                "--prefill", "24", "--batch", "1", "3", "--new-tokens", "3", "--repeats", "1", "--hf", "--out", str(out_file)])
    out = json.loads(out_file.read_text())
    for runner in ("zoo", "transformers"):
        assert out[runner]["prefill_24"]["tokens_per_s"] > 0
        assert {"decode_batch_1", "decode_batch_3"} <= set(out[runner])
    assert out["zoo"]["decode_batch_3"]["step_ms"] > 0 and out["zoo"]["decode_batch_1_step_vs_weights_read"] > 0
    assert out["weight_bytes"] > 0 and out["command"].startswith("python benchmarks/lm_generation.py")
