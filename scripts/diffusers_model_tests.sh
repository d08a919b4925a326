#!/usr/bin/env bash
# diffusers' own PixArt and DiT model tests (ModelTesterMixin and friends), run from a diffusers source checkout
# with every model they build wrapped by `diffcr.apply` (benchmarks/diffusers_conformance/diffcr_routed_models.py).
#
#   bash scripts/diffusers_model_tests.sh DIFFUSERS_SRC [pytest args...]
#
# Three runs per test file: `off` (plain diffusers: the baseline), `dense` (DiffCR at kept ratio 1.0) and
# `routed` (kept ratios below 1.0, frozen). Exits non-zero when a test fails with DiffCR that passes without it.
# Set MODES="dense routed" to skip the baseline; PYTHON to use another interpreter than .venv/bin/python.
# The tests run against the installed diffusers; use a checkout of the same version (the script warns if not).
set -uo pipefail
if [ $# -lt 1 ] || [ ! -d "$1/tests/models/transformers" ]; then
  echo "usage: $0 DIFFUSERS_SRC [pytest args...]   (a diffusers source checkout holding tests/models/transformers)" >&2
  exit 2
fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SRC=$(cd "$1" && pwd)
shift
PY=${PYTHON:-$ROOT/.venv/bin/python}
MODES=${MODES:-off dense routed}
FILES="tests/models/transformers/test_models_pixart_transformer2d.py tests/models/transformers/test_models_dit_transformer2d.py"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}  # offline, the two hub-config tests fail at once instead of retrying
export PYTHONPATH="$ROOT/benchmarks/diffusers_conformance${PYTHONPATH:+:$PYTHONPATH}"

installed=$("$PY" -c "import diffusers; print(diffusers.__version__)") || exit 1
checkout=$(sed -n 's/^ *version="\([^"]*\)".*/\1/p' "$SRC/setup.py" 2>/dev/null | head -1)
echo "diffusers installed: $installed; checkout $SRC: ${checkout:-unknown}"
if [ "$installed" != "$checkout" ]; then
  echo "WARNING: the checkout is not the installed version; failures may come from the version gap (see the off run)"
fi

LOGS=$(mktemp -d)
status=0
cd "$SRC" || exit 1
for mode in $MODES; do
  for file in $FILES; do
    name=$(basename "$file" .py)
    log="$LOGS/$mode-$name.log"
    DIFFCR_MODE=$mode "$PY" -m pytest -q -rfEs -p diffcr_routed_models -p no:cacheprovider -W ignore "$file" "$@" >"$log" 2>&1
    summary=$(grep -E '^=*.*(passed|failed|error|skipped).* in [0-9.]+s' "$log" | tail -1 | tr -d '=')
    echo "$mode $name:${summary:- no summary (see $log)}"
    grep -E '^(FAILED|ERROR) ' "$log" | sed 's/ - .*//' | sort >"$LOGS/$mode-$name.failed"
  done
done
for mode in $MODES; do
  [ "$mode" = off ] && continue
  for file in $FILES; do
    name=$(basename "$file" .py)
    baseline="$LOGS/off-$name.failed"
    [ -f "$baseline" ] || baseline=/dev/null
    new=$(comm -23 "$LOGS/$mode-$name.failed" "$baseline")
    if [ -n "$new" ]; then
      echo "failing with DiffCR ($mode) only:"
      echo "$new"
      status=1
    fi
  done
done
echo "logs: $LOGS"
exit $status
