#!/usr/bin/env bash
# The one GPU check (bench/gpu.py) on an offline GPU machine: install the carried wheels, then run it.
#   bash bench/gpu.sh [--budget 480] [--parts train_speed,accuracy_short]   # results -> $OUT/gpu.json
#   bash bench/gpu.sh --tiny                                                # the same code on CPU
# Prepare what it carries first, here: bash bench/gpu-prepare.sh (wheels in .whl/, tiles in .gpu/).
set -euo pipefail
# The budget (--budget, default 480 s) counts from here, the wheels' install included.
export BUILDSEG_GPU_START=${BUILDSEG_GPU_START:-$(date +%s.%N)}
export NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
PY=${PY:-python3}
# The carried wheels (Python 3.12) only where the packages are missing: the GPU image lacks them, a machine
# with a buildseg environment (the test suite's --tiny run) has them and may be another Python.
if compgen -G ".whl/*.whl" >/dev/null && ! $PY -c "import segmentation_models_pytorch, albumentations, simplejpeg" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec $PY -m bench.gpu --out "${OUT:-bench/results}" "$@"
