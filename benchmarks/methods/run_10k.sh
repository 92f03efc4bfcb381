#!/usr/bin/env bash
# The 10,000-edit method benchmark (issue 25), one model per call, every method in turn:
#   bash benchmarks/methods/run_10k.sh smollm2 [methods]
#   bash benchmarks/methods/run_10k.sh gemma3-270m [methods]
#   SWEEP='lambda=4' bash benchmarks/methods/run_10k.sh smollm2 rlsedit   # rlsedit, then rlsedit at λ = 4
#   SWEEP='lambda=4' bash benchmarks/methods/run_10k.sh smollm2 ''        # rlsedit at λ = 4 alone
#   RESCORE=1 SWEEP='lambda=4' bash benchmarks/methods/run_10k.sh smollm2 rlsedit,alphaedit
#     edits nothing: re-scores the generation metrics of checkpoints that sampled fewer than
#     min(500, edits so far) edits, on weights rebuilt from the target log (FT's computed again;
#     rlsedit bench methods --rescore-generation), and rewrites the report
# It takes days of CPU: run it again after any stop (a killed process, a new machine). A finished
# method is skipped; a half-finished one continues from its session when the machine kept it, else
# rebuilds its batches from the committed target log (<method>/targets/; FT, which logs none, computes
# them again) and continues from there.
# TARGET_ROWS=N: rows per pass of the value-target optimisation (default 32; wider suits a GPU; it
# changes no figure beyond float rounding and is not pinned). Different methods (and the sweep) may
# run at once in separate processes on one folder: each run writes only its own sub-folder
# (run_10k_gpu.sh does this on a GPU machine).
# After each stop, commit the folder (progress.jsonl, targets/, logs/, results.*, plots, and a
# checkpoint-counterfact.jsonl left by a stop mid-checkpoint: a restart on the same CPU, which
# rebuilds the same weights bit for bit, reads its parts back; state/ is ignored) and regenerate the report:
#   rlsedit bench methods --report-only --out benchmarks/methods/<model>-train-n10000-b100 --methods ...
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${1:?model: smollm2 or gemma3-270m}
METHODS=${2-rlsedit,alphaedit,memit,rlsedit-official,rome,ft}
SWEEP=${SWEEP:-}
D=$(cd "${RLSEDIT_DATA:-../shared/data}" && pwd)  # absolute: settings.json pins the paths as given
OUT=${OUT_ROOT:-benchmarks/methods}/$MODEL-train-n10000-b100  # OUT_ROOT: a copy elsewhere (run_10k_gpu.sh)
mkdir -p "$OUT/logs"
bench() {  # bench LOG-NAME ARGS...: one bench call on the common settings, logged under logs/
  local name=$1; shift
  python3 -m rlsedit -v bench methods --model "$MODEL" --data "$D/counterfact/counterfact-train.json" \
    --n 10000 --batch-size 100 --checkpoint-at 500,1000,2000,5000,10000 --retention-first 1000 \
    --stop-below-chance --general ppl,knowns,mmlu,glue --general-n 100 --ppl-tokens 20000 --gen-n 500 \
    --fluency-n 100 --corpus "$D/corpus/enwiki_pages_2MB.jsonl" --data-dir "$D" --threads "${THREADS:-2}" \
    --device "${DEVICE:-cpu}" ${TARGET_ROWS:+--target-rows "$TARGET_ROWS"} --out "$OUT" "$@" \
    >> "$OUT/logs/$name-$(date -u +%Y%m%dT%H%M).log" 2>&1
}
if [ -n "${RESCORE:-}" ]; then  # re-score checkpoints sampled on fewer edits (a run begun under the earlier rule)
  bench rescore --methods "$METHODS" ${SWEEP:+--sweep "$SWEEP"} --rescore-generation
  exit
fi
for m in ${METHODS//,/ }; do
  bench "$m" --methods "$m"
done
if [ -n "$SWEEP" ]; then
  bench "rlsedit-sweep-$(printf %s "$SWEEP" | tr -c 'A-Za-z0-9.-' '_')" \
    --methods rlsedit --sweep "$SWEEP" --sweep-only
fi
python3 -m rlsedit bench methods --report-only --out "$OUT" --methods "${METHODS:-rlsedit}" \
  ${SWEEP:+--sweep "$SWEEP"}
