#!/usr/bin/env bash
# GPU check of raybary.solve, ready to measure (issue 16): problems/s at
# batches of 2^14 ... 2^20 tutorial-family problems, plan iterations, wall
# time per iteration, XLA kernels and host round trips per iteration, the
# device and JAX version, and one correctness line (objectives against JAX's
# CPU backend in the same run), then MW2 distances' pairs/s (issue 18:
# mw2_batch on tutorial-sized pairs). Sizes stop early, saying why, when time or
# memory would run out; the whole run is bounded to under 8 minutes.
#
#   bash benchmarks/gpu_check.sh                   # from the repository root
#   bash benchmarks/gpu_check.sh --sizes 14 15     # options: benchmarks/gpu_check.py --help
#
# Needs a Python with JAX (CUDA), NumPy and pyarrow; not Ray, Zarr, fsspec,
# an installed raybary or the internet: the repository is put on PYTHONPATH.
# The output goes to the terminal and to $OUT/gpu_check-<time>.txt (and .json),
# or /tmp/... when OUT is not set.
# Environment: PYTHON (default python3), GPU_CHECK_LIMIT_S (hard limit,
# default 465 s), RAYBARY_JAX_CACHE (default /tmp/raybary-gpu-check-jax).
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export RAYBARY_JAX_CACHE="${RAYBARY_JAX_CACHE:-/tmp/raybary-gpu-check-jax}"
PYTHON="${PYTHON:-python3}"
LIMIT_S="${GPU_CHECK_LIMIT_S:-465}"
BUDGET_S=$((LIMIT_S - 45))  # sizes stop before this; the rest: start-up, last checks

OUTDIR="${OUT:-/tmp}"
mkdir -p "$OUTDIR" || exit 2
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
LOG="$OUTDIR/gpu_check-$STAMP.txt"
JSON="$OUTDIR/gpu_check-$STAMP.json"

{
    echo "# bash benchmarks/gpu_check.sh $*"
    echo "# repository $ROOT ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo 'no git'))"
    if command -v nvidia-smi >/dev/null 2>&1; then
        echo "# nvidia-smi: $(nvidia-smi --query-gpu=name,memory.total,driver_version \
            --format=csv,noheader 2>&1 | head -4 | tr '\n' ';')"
    else
        echo "# nvidia-smi: not found"
    fi
} | tee "$LOG"

if ! "$PYTHON" -c "import jax, numpy" >/dev/null 2>&1; then
    echo "ERROR: $PYTHON cannot import jax and numpy (set PYTHON=...)" | tee -a "$LOG"
    exit 2
fi

timeout --signal=INT --kill-after=15 "$LIMIT_S" \
    "$PYTHON" -u benchmarks/gpu_check.py --budget-s "$BUDGET_S" --json "$JSON" "$@" 2>&1 \
    | tee -a "$LOG"
status=${PIPESTATUS[0]}
if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    echo "STOP: the run reached the hard limit of $LIMIT_S s; the lines above are what was measured" \
        | tee -a "$LOG"
fi
echo "# exit status $status; output in $LOG" | tee -a "$LOG"
exit "$status"
