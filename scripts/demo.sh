#!/usr/bin/env bash
# One command for a new user: set everything up, then run a local swarm of the default model and
# stream its answer to a prompt. Extra arguments go to scripts/demo.py (e.g. --servers 3 "prompt").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "==> Running the demo: a local swarm of SmolLM2-135M-Instruct on 127.0.0.1"
exec .venv/bin/python scripts/demo.py "$@"
