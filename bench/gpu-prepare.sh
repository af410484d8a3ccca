#!/usr/bin/env bash
# What `bash bench/gpu.sh` carries to an offline GPU machine, within the 64 MiB one call may carry
# (the working tree included): the wheels its image lacks in .whl/, the real tiles in .gpu/buildings-real/.
#   bash bench/gpu-prepare.sh [DATA]      # DATA: default ../shared/data/buildings-real
# Then (README: Scale): run(command="OUT=$OUT bash bench/gpu.sh", carry=[".whl", ".gpu"], timeout_s=560)
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-../shared/data/buildings-real}
limit=$((64 * 1024 * 1024))
# The GPU image (Python 3.12) has torch, timm, huggingface_hub, safetensors, numba, opencv, pandas; it lacks
# smp, albumentations (+ its deps) and simplejpeg (check_data's full JPEG decode). ttach is not used.
../shared/tools/gpu-wheels.sh .whl >/dev/null
rm -f .whl/ttach-*.whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "simplejpeg>=1.7"
rm -rf .gpu/buildings-real && mkdir -p .gpu
cp -r "$data" .gpu/buildings-real
rm -f .gpu/buildings-real/folds.csv   # made on the GPU machine from the seed, as a fresh user's would be
tree=$(git ls-files -co --exclude-standard -z | du --files0-from=- -cb | tail -1 | cut -f1)
carried=$(du -sb .whl .gpu | awk '{s += $1} END {print s}')
total=$((tree + carried))
printf 'working tree %.1f MiB + .whl and .gpu %.1f MiB = %.1f MiB of the 64 MiB a call carries\n' \
  "$(echo "$tree / 1048576" | bc -l)" "$(echo "$carried / 1048576" | bc -l)" "$(echo "$total / 1048576" | bc -l)"
if [ "$total" -gt "$limit" ]; then
  echo "over the limit: carry fewer tiles (delete some of .gpu/buildings-real/train and their rows)" >&2
  exit 1
fi
