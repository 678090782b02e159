#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md, in one go (~6 min on one H100):
#   bash benchmarks/gpu.sh [OUTDIR]
# Each script prints its table; the logs are kept in OUTDIR (default: benchmarks-out/).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import torch; print('torch', torch.__version__)" | tee -a "$out/gpu.txt"
python benchmarks/infer.py --arch vitl --input-size 518 --batch-size 4 --iters 20 2>&1 | tee "$out/infer.log"
python benchmarks/cache.py --teacher-arch vitl --size 560 --images 128 --batch-size 8 2>&1 \
    | tee "$out/cache.log" | grep -v '^cache-teachers'
python benchmarks/train.py --teacher-arch vitl --student-arch vitb --size 560 --images 64 --batch-size 4 --steps 40 \
    --num-workers 8 --compile 2>&1 | tee "$out/train.log" | grep -v ' step '
