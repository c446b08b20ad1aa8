#!/usr/bin/env bash
# One command: set everything up, then run the linters (ruff, import-linter) and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  echo "==> Installing chromium and chromium-driver (the monitor and chat pages are tested in a headless browser)"
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo "sudo")
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver
fi
echo "==> ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "==> import-linter (the one-way import rule and no cycles: pyproject.toml [tool.importlinter])"
.venv/bin/lint-imports
echo "==> pytest"
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
