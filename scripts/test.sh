#!/usr/bin/env bash
# Install diffcr into .venv (created if missing) and run the test suite. Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -m slow` for the slower end-to-end tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q "$@"
