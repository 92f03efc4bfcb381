#!/usr/bin/env bash
# The GPU speed run (benchmarks/gpu/README.md): run from the repository root on the lent GPU
# machine, with .gpu/ holding SmolLM2's tokenizer files, the first 200 CounterFact train records
# (cf-train-200.json) and the 2 MB Wikipedia corpus. Results go to $OUT (or ./gpu-out).
set -euo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
N=${N:-60}
REF=${REF:-20}
HP=${HP:-benchmarks/gpu/llama3-8b-layers.json}
SMOKE=${SMOKE:-1}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
common=(--data .gpu/cf-train-200.json --corpus .gpu/enwiki_pages_2MB.jsonl --batch-size 20
        --hparams "$HP" --device cuda --cache-dir /tmp/rlsedit-cache)
# smoke: the whole path on CUDA with a tiny model first, so a device bug shows in seconds
[ "$SMOKE" = 1 ] && python3 benchmarks/gpu/make_random_llama.py --tokenizer .gpu --out /tmp/tiny-random --layers 10 \
    --hidden 64 --intermediate 256 --heads 4 --kv-heads 2 --vocab 49152 2>&1 | tee "$OUT/smoke.log"
[ "$SMOKE" = 1 ] && python3 -m rlsedit bench speed --model /tmp/tiny-random "${common[@]}" --n 20 --reference-n 20 \
    2>&1 | tee -a "$OUT/smoke.log"
t0=$(date +%s)
[ -f /tmp/llama3-8b-random/config.json ] || python3 benchmarks/gpu/make_random_llama.py --tokenizer .gpu --out /tmp/llama3-8b-random 2>&1 | tee "$OUT/make.log"
echo "model written in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/make.log"
python3 -m rlsedit -v bench speed --model /tmp/llama3-8b-random "${common[@]}" --n "$N" --reference-n "$REF" \
    --out "$OUT/speed" 2>&1 | tee "$OUT/speed.log"
echo "total $(( $(date +%s) - t0 )) s" | tee -a "$OUT/speed.log"
