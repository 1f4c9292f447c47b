#!/usr/bin/env bash
# Speech enhancement on one GPU (issue 22 item 3): MambAttention and the plain TF-Mamba baseline at the paper's size,
# each trained for a fixed time budget on the noisy digit-string corpus and evaluated (PESQ / STOI / SI-SDR against
# the noisy input) on held-out voices, noise types and SNRs. About 7-8 minutes on an H200 in all.
#
# The GPU machine has no network and (as far as we know) no espeak-ng, so the clean corpus is synthesized here first
# and travels with the working tree, with wheels of the metric packages:
#   python -c "from zoo.data.speech import build_corpus; build_corpus('digits', 'runs/enhance/corpus', n_strings=1200, seed=0)"
#   pip download --no-deps -d runs/enhance/wheels pystoi==0.4.1 torchmetrics==1.9.0 lightning-utilities==0.15.3 soundfile
#   pip wheel --no-deps -w runs/enhance/wheels pesq==0.0.4      # builds for this Python (cp311)
# then (device tool): command "bash benchmarks/speech_enhance_gpu.sh", carry ["runs/enhance/corpus", "runs/enhance/wheels"].
# Results: $OUT/speech_enhance_<model>_h200.json (copy them to benchmarks/results/) and the weights.
set -euo pipefail
OUT=${OUT:-runs/enhance/gpu}
mkdir -p "$OUT"
python -c "import pesq, pystoi, torchmetrics, soundfile" 2>/dev/null || \
    pip install -q --no-index --find-links runs/enhance/wheels pesq pystoi torchmetrics lightning-utilities soundfile
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
for model in mambattention mamba_se; do
    python -m zoo speech enhance-train --model "$model" --cache-dir runs/enhance/corpus --n-strings 1200 --seed 0 \
        --epochs 1000 --max-seconds 150 --batch-size 8 --segment 2.0 --lr 1e-3 --device cuda --amp bf16 \
        --eval-limit 120 --no-progress \
        --output "$OUT/speech_enhance_${model}_h200.json" --save-weights "$OUT/${model}_h200.safetensors"
done
