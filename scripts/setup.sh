#!/usr/bin/env bash
# Create .venv and install llmtrain. Never pulls a CUDA build of torch onto a machine without a GPU:
# CPU machines get the CPU wheel (a local/find-links torch==2.13.0+cpu if pip can see one, else the
# PyTorch CPU index); GPU machines get the default CUDA wheel. Usage: scripts/setup.sh [extras]
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
py="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$py" -m venv .venv
pip=".venv/bin/python -m pip"
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    $pip install -q torch
  elif ! $pip install -q "torch==2.13.0+cpu" 2>/dev/null && ! $pip install -q "torch==2.13.0" --no-index 2>/dev/null; then
    $pip install -q torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
$pip install -q -e ".[${extras}]"
.venv/bin/python -c "import torch, llmtrain; print(f'llmtrain {llmtrain.__version__}, torch {torch.__version__}')"
