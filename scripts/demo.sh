#!/usr/bin/env bash
# Install diffcr into .venv (created if missing) and run the embedded demo on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python examples/quickstart.py "$@"
