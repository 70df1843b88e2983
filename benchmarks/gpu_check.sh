#!/usr/bin/env bash
# The one-command GPU check of pyiqa_grmp, for a borrowed GPU machine that has torch but neither pyiqa nor
# open_clip, and no network. Run from the repository root:
#
#     bash benchmarks/gpu_check.sh WHEEL_DIR              # on the GPU machine (<= 8 minutes on one H100)
#     bash benchmarks/gpu_check.sh --dry-run [WHEEL_DIR]  # the same steps on CPU with a tiny backbone (< 4 min)
#     bash benchmarks/gpu_check.sh --check-only [--dry-run] [WHEEL_DIR]   # arguments, files and plan only
#
# WHEEL_DIR holds the wheels of benchmarks/gpu_wheels.txt (fetch them with benchmarks/download_gpu_wheels.sh);
# they are checked against their sha256 and installed with pip --no-index --no-deps into a temporary folder.
# Without WHEEL_DIR (dry run only) the current environment is used. The package itself is used from the
# repository root (PYTHONPATH), nothing is built.
#
# Each step runs under its own time limit (and the whole check under a budget), so one hang costs only its own
# time; a failed step is reported and the check goes on. Every step's output goes to one log; the lines that
# begin with "result: " (else its last line) fill the summary table, which is printed at the end and written,
# with the log, to $OUT/gpu_report.md and $OUT/gpu_check.log when OUT is set. Exit status: 0 when every step
# passed (or was skipped with its reason), 1 when any failed, 2 for bad arguments or missing files.
#
# To add a step: one `step NAME SECONDS COMMAND...` line in the plan below.
set -uo pipefail

usage() {
    echo "usage: bash benchmarks/gpu_check.sh [--dry-run] [--check-only] [WHEEL_DIR]" >&2
    echo "  WHEEL_DIR is required except with --dry-run" >&2
}
fail_usage() { echo "gpu_check: error: $1" >&2; usage; exit 2; }

dry_run=0 check_only=0 wheels=""
for arg in "$@"; do
    case "$arg" in
        --dry-run) dry_run=1 ;;
        --check-only) check_only=1 ;;
        -h|--help) usage; exit 0 ;;
        -*) fail_usage "unknown option $arg" ;;
        *) [ -z "$wheels" ] || fail_usage "one WHEEL_DIR only (got $wheels and $arg)"; wheels=$arg ;;
    esac
done
[ "$dry_run" = 1 ] || [ -n "$wheels" ] || fail_usage "give the folder of wheels listed in benchmarks/gpu_wheels.txt"

# ------------------------------------------------------------------------------------------------ file checks
[ -f pyiqa_grmp/__init__.py ] && [ -f benchmarks/gpu_wheels.txt ] && [ -d tests ] ||
    fail_usage "run from the repository root (pyiqa_grmp/, tests/ and benchmarks/gpu_wheels.txt not found in $PWD)"
PYTHON=${PYTHON:-python3}
wheel_list=$(grep -v '^#' benchmarks/gpu_wheels.txt | awk 'NF')
if [ -n "$wheels" ]; then
    [ -d "$wheels" ] || fail_usage "wheel folder $wheels does not exist"
    missing=""
    for name in $(echo "$wheel_list" | awk '{print $2}'); do
        [ -f "$wheels/$name" ] || missing="$missing $name"
    done
    [ -z "$missing" ] || fail_usage "wheel folder $wheels lacks:$missing (bash benchmarks/download_gpu_wheels.sh)"
    echo "$wheel_list" | (cd "$wheels" && sha256sum --check --strict --quiet) ||
        fail_usage "a wheel in $wheels does not match its sha256 in benchmarks/gpu_wheels.txt"
fi

# ------------------------------------------------------------------------------------------------ settings
if [ "$dry_run" = 1 ]; then
    mode="dry run (CPU, tiny backbone)" device=cpu batch=4 runs=1 warmup=1 threads=2 ft_batch=4 task=8 images=8
    size=128
    budget=${GPU_CHECK_BUDGET_S:-240}
    vision='{image_size: 224, layers: 2, width: 64, head_width: 32, patch_size: 16}'
    backbone="{embed_dim: 32, vision_cfg: $vision, text_cfg: {context_length: 77, width: 32, heads: 2, layers: 2}}"
    precisions="fp32 bf16" tp_images=8 tp_workers="0 2" tp_pyiqa=4 tp_baseline=8 tp_per_image=4
else
    mode="GPU (CUDA, ViT-B/16 random weights)" device=cuda batch=64 runs=10 warmup=2 threads=8 ft_batch=16 task=20
    images=512 size=384 budget=${GPU_CHECK_BUDGET_S:-540}
    backbone=ViT-B-16-quickgelu
    precisions="fp32 bf16 fp16" tp_images=1000 tp_workers="16" tp_pyiqa=50 tp_baseline=300 tp_per_image=30
fi
bench=(--device "$device" --backbone "$backbone" --threads "$threads")

# ------------------------------------------------------------------------------------------------ the runner
rows=() failed=0 started=$SECONDS
work=$(mktemp -d)
log="$work/gpu_check.log"
: >"$log"
trap 'rm -rf "$work"' EXIT

cell() { tr '\n|' ' /' <<<"$1" | cut -c1-700; }

step() {  # step NAME SECONDS COMMAND... : run COMMAND under min(SECONDS, budget left) and add its row
    local name=$1 limit=$2
    shift 2
    if [ "$check_only" = 1 ]; then
        if [[ "${2:-}" == *.py && ! -f "${2:-}" ]]; then echo "missing script for step $name: $2" >&2; failed=1; fi
        echo "step: $name (limit ${limit}s): $*"
        return
    fi
    local left=$((budget - (SECONDS - started)))
    if [ "$left" -lt 15 ]; then
        rows+=("| $name | not run | 0 | the check's time budget (${budget}s) was spent |"); failed=1; return
    fi
    [ "$limit" -le "$left" ] || limit=$left
    local out="$work/step.log" begin=$SECONDS status result code
    echo "== $name (limit ${limit}s)" >&2
    timeout --kill-after=10 "$limit" "$@" >"$out" 2>&1
    code=$?
    local took=$((SECONDS - begin))
    case $code in
        0) status=PASS ;;
        124|137) status="TIMEOUT (${limit}s)"; failed=1 ;;
        *) status="FAIL (exit $code)"; failed=1 ;;
    esac
    result=$(grep '^result: ' "$out" | sed 's/^result: //' | paste -sd ';' -)
    [ -n "$result" ] || result=$(grep -v '^[[:space:]]*$' "$out" | tail -n 1)
    if [ "$status" != PASS ]; then
        echo "-- $name: $status; last lines of its output:" >&2
        tail -n 25 "$out" >&2
    fi
    { echo "===== $name: $status in ${took}s"; echo "\$ $*"; cat "$out"; echo; } >>"$log"
    rows+=("| $name | $status | $took | $(cell "$result") |")
}

skip() {  # skip NAME REASON
    [ "$check_only" = 1 ] && { echo "step: $1 (skipped: $2)"; return; }
    rows+=("| $1 | skipped | 0 | $2 |")
}

# ------------------------------------------------------------------------------------------------ set-up
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 PIP_ROOT_USER_ACTION=ignore
if [ -n "$wheels" ] && [ "$check_only" = 0 ]; then
    site="$work/site"
    # shellcheck disable=SC2046
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
        $(echo "$wheel_list" | awk -v dir="$wheels" '{print dir "/" $2}') ||
        { echo "gpu_check: pip install failed" >&2; exit 2; }
    # pyiqa's wheel also installs top-level tests/, docs/, options/, build/ and ResultsCalibra/, which nothing
    # imports; removed so that no top-level name can shadow one of ours.
    rm -rf "$site"/tests "$site"/docs "$site"/options "$site"/build "$site"/ResultsCalibra
    export PYTHONPATH="$PWD:$site"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
echo "gpu_check: $mode, budget ${budget}s, wheels: ${wheels:-current environment}" >&2

# ------------------------------------------------------------------------------------------------ the plan
step "environment" 90 "$PYTHON" -c "
import torch, pyiqa, open_clip, pyiqa_grmp
cuda = torch.cuda.is_available()
name = torch.cuda.get_device_name() if cuda else 'no CUDA device'
print(f'result: torch {torch.__version__}, {name}, pyiqa {pyiqa.__version__}, open_clip {open_clip.__version__}, '
      f'pyiqa_grmp {pyiqa_grmp.__version__} from {pyiqa_grmp.__file__}')
raise SystemExit(0 if cuda or '$device' == 'cpu' else 'CUDA is not available')"
step "pytest -m gpu" 300 "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider tests
for precision in fp32 bf16 fp16; do
    if [[ " $precisions " == *" $precision "* ]]; then
        step "inference $precision, batch $batch" 75 "$PYTHON" benchmarks/inference.py "${bench[@]}" \
            --batch "$batch" --precision "$precision" --runs "$runs" --warmup "$warmup"
    else
        skip "inference $precision, batch $batch" "fp16 runs on CUDA only"
    fi
done
step "score difference vs fp32" 75 "$PYTHON" benchmarks/precision.py "${bench[@]}"
step "fine-tuning step ratio" 90 "$PYTHON" benchmarks/finetune_step.py "${bench[@]}" --batch "$ft_batch" \
    --runs "$runs" --warmup "$warmup"
step "meta-training peak memory" 90 "$PYTHON" benchmarks/meta_pretrain.py "${bench[@]}" --task-size "$task" \
    --support-batch "$ft_batch" --runs "$runs" --warmup "$warmup"
step "score end to end" 120 "$PYTHON" benchmarks/score_folder.py "${bench[@]}" --images "$images" --size "$size" \
    --batch "$batch"
# today's score for the ratio: git shows it in a clone; a copy without .git carries .gpucheck/607a155/ holding
# scoring.py and image_io.py of that commit (git show 607a155:pyiqa_grmp/scoring.py, .../data/image_io.py)
baseline=()
if [ -d .gpucheck/607a155 ]; then baseline=(--baseline-dir .gpucheck/607a155); fi
# on CUDA its rows include the exact path, bf16, GPU decoding and --fast end to end, GPU decode alone, and the
# deviation of each from the exact path's scores (its "result:" lines fill the table row)
step "score throughput (mixed-size JPEGs)" 240 "$PYTHON" benchmarks/score_throughput.py "${bench[@]}" \
    --images "$tp_images" --workers $tp_workers --batch "$batch" --runs 1 --warmup 1 --pyiqa-images "$tp_pyiqa" \
    --per-image "$tp_per_image" \
    --baseline-images "$tp_baseline" --folder "${TMPDIR:-/tmp}/gpu_check_throughput" "${baseline[@]}"
step "distributed benchmark, 1 rank" 90 "$PYTHON" benchmarks/distributed.py "${bench[@]}" --ranks 1 --runs 3 \
    --batch "$ft_batch"

# ------------------------------------------------------------------------------------------------ the report
if [ "$check_only" = 1 ]; then
    [ "$failed" = 0 ] || exit 2
    echo "gpu_check: arguments and files are fine (${mode}); nothing was run"
    exit 0
fi
report="$work/gpu_report.md"
{
    echo "## GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'): $mode"
    echo
    python_version=$("$PYTHON" -c 'import platform; print(platform.python_version())')
    echo "Total ${SECONDS}s of a ${budget}s budget; Python $python_version; host $(hostname)."
    echo
    echo "| step | status | seconds | result |"
    echo "|---|---|---|---|"
    printf '%s\n' "${rows[@]}"
} >"$report"
cat "$report"
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT" && cp "$report" "$log" "$OUT"/ && echo "wrote $OUT/gpu_report.md and $OUT/gpu_check.log" >&2
fi
exit "$failed"
