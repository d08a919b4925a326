#!/usr/bin/env bash
# One prepared run for a machine with an NVIDIA GPU (about 12 minutes): the test suite, the full-size
# PixArt-Sigma speed table in bf16, then a text-to-image training step and pipeline sampling. Uses the
# machine's own torch (CUDA build); installs diffcr without dependencies when they are already present.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name(0))" || exit 1
"$PY" -m pip install -q --no-deps -e . 2>/dev/null || "$PY" -m pip install -q -e .
status=0
# one device command may run 10 minutes: the parts below fit in 9; PART (tests, speed, t2i, compile) runs one
# of them (`all` runs the first three; compile is its own command)
PART=${1:-all}
if [ "$PART" = all ] || [ "$PART" = tests ]; then
  timeout 170 "$PY" -m pytest -q -x tests/test_gpu.py tests/test_api.py tests/test_routing.py tests/test_ratios.py || status=$?
fi
if [ "$PART" = all ] || [ "$PART" = speed ]; then
  # PixArt-Sigma at 4096 tokens, SD3- and Flux-shaped rows at 1024 and 4096 tokens, bf16
  timeout 220 "$PY" benchmarks/gpu_speed.py --repeats 5 || status=$?
fi
if [ "$PART" = all ] || [ "$PART" = t2i ]; then
  # text-to-image: a training step and pipeline sampling of a full-size PixArt-Sigma, 512 and 1024 px, bf16
  timeout 150 "$PY" benchmarks/gpu_t2i.py --sizes 512,1024 --repeats 3 || status=$?
fi
if [ "$PART" = compile ]; then
  # compiled dense vs compiled DiffCR, whole model and regional, default and reduce-overhead (CUDA graphs):
  # full-size PixArt-Sigma at 4096 tokens, bf16, kept 0.5; then recompiles over a 4-region schedule
  timeout 540 "$PY" benchmarks/compile_speed.py --device cuda --dtype bf16 --width 1152 --layers 28 --heads 16 \
    --tokens 4096 --modes default,reduce-overhead --repeats 10 || status=$?
fi
exit $status
