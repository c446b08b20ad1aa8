#!/usr/bin/env bash
# The exactness tests again, in a second virtual environment (.venv-newest) with the newest dependency
# versions setup.cfg allows (no constraints.txt), so a release that breaks us is found by CI, not by a
# user. torch 2.13.0 (CPU build) is installed first, as in scripts/setup.sh. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${NEWEST_VENV:-.venv-newest}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  echo "==> Creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  echo "==> Installing torch 2.13.0 (CPU build) first, so nothing pulls CUDA packages"
  "${PIP[@]}" install torch==2.13.0
fi

echo "==> Installing Stamen with the newest dependency versions setup.cfg allows (torch held at 2.13.0)"
echo "torch==2.13.0" > "$VENV/torch-constraint.txt"
"${PIP[@]}" install --upgrade --upgrade-strategy eager -c "$VENV/torch-constraint.txt" -e ".[dev]"
echo "==> Resolved versions ($VENV)"
"$VENV/bin/python" -m pip list --format=freeze 2>/dev/null \
  | grep -iE '^(torch|transformers|tokenizers|huggingface.hub|safetensors|accelerate|hivemind|protobuf|numpy|gguf|uvloop|multiaddr|pytest|pytest-timeout)==' \
  | sed 's/^/    /'

# Every family adapter in process (the server's block stacks and the client's generate, against local
# transformers), and the swarm exactness suite (real servers: splits, push, padded batches, sessions). The
# per-family swarm tests (tests/swarm/test_families.py) add nothing that depends on transformers' version
# beyond these and would double this run's time; the main run has them.
echo "==> pytest: exactness tests with the newest allowed versions"
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
  tests/unit/test_families.py tests/unit/test_masks.py tests/swarm/test_exactness.py "$@"
