#!/usr/bin/env bash
# Speech enhancement on one GPU (issue 22 item 3): MambAttention and the plain TF-Mamba baseline at the paper's size,
# each trained for a fixed time budget on the noisy digit-string corpus and evaluated (PESQ / STOI / SI-SDR against
# the noisy input) on held-out voices, noise types and SNRs. About 7-8 minutes on an H200 in all.
#
# The GPU machine (Python 3.12, no network) has scipy, torchmetrics and numpy 2.x but neither espeak-ng, pesq, pystoi
# nor soundfile, so the clean corpus is synthesized here and travels with the working tree (about 32 MB), with wheels
# for Python 3.12 (about 2 MB), made here once:
#   python -c "from zoo.data.speech import build_corpus; build_corpus('digits', 'runs/enhance/corpus', n_strings=1200, seed=0)"
#   ~/.pyenv/versions/3.12.1/bin/python -m pip wheel --no-deps -w runs/enhance/wheels pesq==0.0.4   # sdist only: built
#   pip download --no-deps -d runs/enhance/wheels pystoi==0.4.1 soundfile==0.14.0
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 \
#       -d runs/enhance/wheels cffi pycparser
# then (device tool): command "bash benchmarks/speech_enhance_gpu.sh", carry ["runs/enhance/corpus", "runs/enhance/wheels"].
# Results: $OUT/speech_enhance_<model>_h200.json (copy them to benchmarks/results/) and the trained weights.
set -euo pipefail
OUT=${OUT:-runs/enhance/gpu}
mkdir -p "$OUT"
if ! python3 -c "import pesq, pystoi, torchmetrics, soundfile" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site runs/enhance/wheels/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
for model in mambattention mamba_se; do
    python3 -m zoo speech enhance-train --model "$model" --cache-dir runs/enhance/corpus --n-strings 1200 --seed 0 \
        --epochs 1000 --max-seconds 150 --batch-size 8 --segment 2.0 --lr 1e-3 --device cuda --amp bf16 \
        --eval-limit 120 --no-progress \
        --output "$OUT/speech_enhance_${model}_h200.json" --save-weights "$OUT/${model}_h200.safetensors"
done
