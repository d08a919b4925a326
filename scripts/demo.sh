#!/usr/bin/env bash
# Install diffcr into .venv (created if missing) and run the embedded demo on CPU: compress the shipped DiT on
# the bundled digits, sample dense and DiffCR, measure, report. Extra arguments go to `diffcr demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/diffcr demo "$@"
