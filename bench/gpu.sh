#!/usr/bin/env bash
# Every GPU figure of the README, for a machine with a CUDA GPU (e.g. the lent H100).
#   bash bench/gpu.sh [speed|accuracy|baseline|all]     # results -> bench/results/*.json (and $OUT if set)
# The lent device runs at most 10 minutes per command: call the stages one by one there.
# On an offline GPU host without smp/albumentations/ttach, first put their wheels in .whl/
# (../shared/tools/gpu-wheels.sh) and the real data in .gpu/buildings-real (both git-ignored).
set -euo pipefail
export NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
PY=${PY:-python3}
DATA=${BUILDSEG_REAL_DATA:-$( [ -d .gpu/buildings-real ] && echo .gpu/buildings-real || echo ../shared/data/buildings-real )}
export BUILDSEG_REAL_DATA=$DATA BUILDSEG_CACHE=/tmp/buildseg-cache
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
stage=${1:-all}
if [[ $stage == speed || $stage == all ]]; then
  $PY -m bench.train_throughput --data "$DATA" --tag h100 train.compile=true data.num_workers=12
  $PY -m bench.infer_throughput --data "$DATA" --tag h100 --workers 12
  $PY -m bench.models --tag h100
fi
if [[ $stage == accuracy || $stage == all ]]; then
  $PY -m bench.accuracy --data "$DATA" train.runs_dir=/tmp/runs
fi
if [[ $stage == baseline || $stage == all ]]; then
  $PY -m bench.accuracy --data "$DATA" --config configs/baseline-fcn.yaml train.runs_dir=/tmp/runs
fi
if [ -n "${OUT:-}" ]; then cp bench/results/*.json "$OUT"/; fi
