#!/usr/bin/env bash
# The capacity study of issue 25 on the val split (tuning data only): past ~1,536 edits every
# layer's keys outnumber its width, so all 1,919 val edits in batches of 100 are already over
# capacity on SmolLM2's 5-layer band. One stream per setting, rlsedit, the same edits:
#   bash benchmarks/methods/capacity_val.sh smollm2                 # defaults + the settings below
#   bash benchmarks/methods/capacity_val.sh smollm2 'lambda=4'      # one more sweep point
# Each setting is one resumable run in the same folder (rlsedit[...]); rerun after any stop.
# Status and figures: the folder's README.md (every setting above done at 1,919 edits).
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${1:?model: smollm2 or gemma3-270m}
shift
SWEEPS=("$@")
[ ${#SWEEPS[@]} -eq 0 ] && SWEEPS=('layers=2-11' 'lambda=4' 'mu=2' 'layers=2-8')
D=$(cd "${RLSEDIT_DATA:-../shared/data}" && pwd)  # absolute: settings.json pins the paths as given
OUT=benchmarks/methods/$MODEL-val-n1919-b100-capacity
mkdir -p "$OUT/logs"
ARGS=(--model "$MODEL" --data "$D/counterfact/counterfact-val.json" --n 1919 --batch-size 100
      --checkpoint-at 500,1000,1919 --retention-first 500 --general ppl,knowns,mmlu --general-n 100
      --ppl-tokens 20000 --gen-n 200 --fluency-n 50 --corpus "$D/corpus/enwiki_pages_2MB.jsonl"
      --data-dir "$D" --threads 2 --out "$OUT")
stamp() { date -u +%Y%m%dT%H%M; }
python3 -m rlsedit -v bench methods "${ARGS[@]}" --methods rlsedit >> "$OUT/logs/rlsedit-$(stamp).log" 2>&1
for s in "${SWEEPS[@]}"; do
  python3 -m rlsedit -v bench methods "${ARGS[@]}" --methods rlsedit --sweep "$s" \
    >> "$OUT/logs/sweep-$(stamp).log" 2>&1
done
python3 -m rlsedit bench methods --report-only --out "$OUT"
