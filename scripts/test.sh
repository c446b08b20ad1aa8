#!/usr/bin/env bash
# One command: set everything up, then run the linter and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  echo "==> Installing chromium and chromium-driver (for the browser tests)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver
fi
echo "==> ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "==> pytest"
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
