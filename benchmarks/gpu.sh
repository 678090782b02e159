#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md (~12 min on one H100 for everything; split it over
# calls when a call has a time limit: the goals are in `cache` and `train`):
#   bash benchmarks/gpu.sh OUTDIR [infer] [cache] [losses] [losses-compile] [train] [train-compile]
# Each script prints its table; the logs are kept in OUTDIR (default: $OUT, else benchmarks-out/).
# First the GPU-only tests (tests/test_cuda.py, ~1 min; SKIP_TESTS=1 leaves them out): a failure
# there makes the figures suspect. The exit status is non-zero when any part failed.
# dad need not be installed: the repository root goes on PYTHONPATH; its dependencies (zarr,
# numcodecs, webdataset, ...) must import ($PYTHON picks the interpreter, default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
parts="infer cache losses losses-compile train train-compile"
out=${1:-${OUT:-benchmarks-out}}
if [[ " $parts " == *" $out "* ]]; then
    echo "gpu.sh: the first argument is the output folder, then the parts: bash benchmarks/gpu.sh OUTDIR $*" >&2
    exit 2
fi
shift || true
which=" ${*:-$parts} "
py=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
mkdir -p "$out"
if ! "$py" -c "import dad.cache, dad.train.loop, zarr, numcodecs, webdataset, google_crc32c"; then
    echo "gpu.sh: dad or its dependencies do not import with $py (above); put their wheels on PYTHONPATH" >&2
    exit 1
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; "$py" -c "import torch; print('torch', torch.__version__)"; } \
    2>&1 | tee "$out/gpu.txt"
failed=()

part() {  # part NAME COMMAND...: run it, keep its whole log, show it without per-step lines
    local name=$1
    shift
    "$@" 2>&1 | tee "$out/$name.log" | grep -Ev '^(cache-teachers|[0-9-]+ [0-9:]+ step )'
    local status=${PIPESTATUS[0]}
    if ((status != 0)); then
        failed+=("$name (exit $status)")
    fi
}

if [[ -z ${SKIP_TESTS:-} ]]; then
    part test_cuda "$py" -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py
fi
if [[ $which == *" infer "* ]]; then
    part infer "$py" benchmarks/infer.py --arch vitl --input-size 518 --batch-size 4 --iters 20
fi
if [[ $which == *" cache "* ]]; then
    # the variants the goal and the encoder-thread question need (no-patch-rgb: measured before)
    part cache "$py" benchmarks/cache.py --teacher-arch vitl --size 560 --images 384 --batch-size 8 \
        --variants zarr/png2,webdataset/png2,zarr/png2/enc2
fi
if [[ $which == *" losses "* ]]; then
    part losses "$py" benchmarks/losses.py
fi
if [[ $which == *" losses-compile "* ]]; then
    part losses-compile "$py" benchmarks/losses.py --compile
fi
for name in train train-compile; do
    if [[ $which == *" $name "* ]]; then
        flag=()
        # the compiled runs, both modes side by side, leave out the eager step's breakdown
        [[ $name == train-compile ]] && flag=(--compile --compile-mode default,reduce-overhead --no-breakdown)
        # with a trace of 3 cached steps per mode in OUTDIR (benchmarks/trace_gaps.py reads it)
        part "$name" "$py" benchmarks/train.py --teacher-arch vitl --student-arch vitb --size 560 --images 64 \
            --batch-size 4 --steps 30 --num-workers 8 --trace-dir "$out" ${flag[@]+"${flag[@]}"}
    fi
done
# where the traced steps' GPU time went (benchmarks/trace_gaps.py), in one file beside the traces
for trace in "$out"/trace-*.json.gz; do
    [[ -f $trace ]] && "$py" benchmarks/trace_gaps.py "$trace" --top 10 >> "$out/trace-gaps.txt" 2>&1
done
# the rows the goals are judged on, together at the end
logs=()
for name in train train-compile; do
    [[ -f $out/$name.log ]] && logs+=("$out/$name.log")
done
if [[ -f $out/cache.log || ${#logs[@]} -gt 0 ]]; then
    echo
    echo "== goals: stage 1 pipeline >= 80% of the forwards alone; training cached >= 5x online, data wait < 5% =="
    [[ -f $out/cache.log ]] && grep -E "^(teacher forwards alone|pipeline, )" "$out/cache.log"
    for log in ${logs[@]+"${logs[@]}"}; do
        echo "-- $(basename "$log" .log)"
        grep -E "^(source|cache|online)[ ,]|^cached / online|^\(cached step|^compiled graphs left out" "$log"
    done
    [[ -f $out/trace-gaps.txt ]] && grep -E "^(\S+trace-\S+:|GPU busy)" "$out/trace-gaps.txt"
fi
if ((${#failed[@]})); then
    echo "gpu.sh: failed: ${failed[*]} (logs in $out)" >&2
    exit 1
fi
