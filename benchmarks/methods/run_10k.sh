#!/usr/bin/env bash
# The 10,000-edit method benchmark (issue 25), one model per call, every method in turn:
#   bash benchmarks/methods/run_10k.sh smollm2 [methods]
#   bash benchmarks/methods/run_10k.sh gemma3-270m [methods]
#   SWEEP='lambda=4' bash benchmarks/methods/run_10k.sh smollm2 rlsedit   # rlsedit at λ = 4 after rlsedit
# It takes days of CPU: run it again after any stop (a killed process, a new machine). A finished
# method is skipped; a half-finished one continues from its session when the machine kept it, else
# rebuilds its batches from the committed target log (<method>/targets/) and continues from there.
# After each stop, commit the folder (progress.jsonl, targets/, logs/, results.*, plots; state/ is
# ignored) and regenerate the report:
#   rlsedit bench methods --report-only --out benchmarks/methods/<model>-train-n10000-b100 --methods ...
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${1:?model: smollm2 or gemma3-270m}
METHODS=${2:-rlsedit,alphaedit,memit,rlsedit-official,rome,ft}
SWEEP=${SWEEP:-}
D=$(cd "${RLSEDIT_DATA:-../shared/data}" && pwd)  # absolute: settings.json pins the paths as given
OUT=${OUT_ROOT:-benchmarks/methods}/$MODEL-train-n10000-b100  # OUT_ROOT: a copy elsewhere (run_10k_gpu.sh)
mkdir -p "$OUT/logs"
for m in ${METHODS//,/ }; do
  python3 -m rlsedit -v bench methods --model "$MODEL" --data "$D/counterfact/counterfact-train.json" \
    --n 10000 --batch-size 100 --checkpoint-at 500,1000,2000,5000,10000 --retention-first 1000 \
    --stop-below-chance --general ppl,knowns,mmlu,glue --general-n 100 --ppl-tokens 20000 --gen-n 500 \
    --fluency-n 100 --corpus "$D/corpus/enwiki_pages_2MB.jsonl" --data-dir "$D" --threads "${THREADS:-2}" --device "${DEVICE:-cpu}" \
    --out "$OUT" --methods "$m" ${SWEEP:+--sweep "$SWEEP"} >> "$OUT/logs/$m-$(date -u +%Y%m%dT%H%M).log" 2>&1
done
python3 -m rlsedit bench methods --report-only --out "$OUT" --methods "$METHODS" ${SWEEP:+--sweep "$SWEEP"}
