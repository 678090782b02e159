#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md (~10 min on one H100 for all six parts):
#   bash benchmarks/gpu.sh [OUTDIR [infer] [cache] [losses] [losses-compile] [train] [train-compile]]
# Each script prints its table; the logs are kept in OUTDIR (default: benchmarks-out/). Name
# some parts after OUTDIR to run only those (e.g. to fit a per-call time limit). First, always,
# the GPU-only tests (tests/test_cuda.py, ~1 min): a failure there makes the figures suspect.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks-out}
shift || true
which=" ${*:-infer cache losses losses-compile train train-compile} "
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import torch; print('torch', torch.__version__)" | tee -a "$out/gpu.txt"
python -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py 2>&1 | tee "$out/test_cuda.log" | tail -n 15
if [[ $which == *" infer "* ]]; then
    python benchmarks/infer.py --arch vitl --input-size 518 --batch-size 4 --iters 20 2>&1 | tee "$out/infer.log"
fi
if [[ $which == *" cache "* ]]; then
    python benchmarks/cache.py --teacher-arch vitl --size 560 --images 128 --batch-size 8 2>&1 \
        | tee "$out/cache.log" | grep -v '^cache-teachers'
fi
if [[ $which == *" losses "* ]]; then
    python benchmarks/losses.py 2>&1 | tee "$out/losses.log"
fi
if [[ $which == *" losses-compile "* ]]; then
    python benchmarks/losses.py --compile 2>&1 | tee "$out/losses-compile.log"
fi
for part in train train-compile; do
    if [[ $which == *" $part "* ]]; then
        flag=$([[ $part == train-compile ]] && echo --compile)
        python benchmarks/train.py --teacher-arch vitl --student-arch vitb --size 560 --images 64 --batch-size 4 \
            --steps 30 --num-workers 8 $flag 2>&1 | tee "$out/$part.log" | grep -Ev '^[0-9-]+ [0-9:]+ step '
    fi
done
