#!/usr/bin/env bash
# One command for a short GPU window: environment, GPU tests, kernel and model benchmarks, plots and
# the targets table, each stage under its own time limit, all of it within TOTAL_LIMIT seconds.
#
#   bash benchmarks/gpu_check.sh OUT_DIR              on a machine with a CUDA GPU
#   bash benchmarks/gpu_check.sh --dry-run OUT_DIR    on a CPU: every stage through Triton's interpreter
#                                                     at tiny sizes (checks the plumbing, not the speed)
#
# OUT_DIR receives at most 8 files, no subdirectories:
#   gpu_check.log                         everything printed
#   gpu_check.json                        each stage's status (passed/failed/timed-out/skipped), reason and
#                                         seconds; environment, test counts, launch overhead, targets table
#   gpu_check_junit.xml                   the test results
#   adapter_bench_<device>_<date>.json    kernel and model results in the schema of `python -m benchmarks --out`
#   adapter_bench_<device>_<date>_*.png   speedup and copy-bandwidth plots (when matplotlib is installed)
#
# A stage that fails or runs out of time does not stop the next one. The exit status is 0 when every
# stage passed or had nothing to do, 1 otherwise (a stage failed, timed out or was not started for
# lack of time), 2 for a usage error.
#
# Environment: PYTHON (default python3; the project is installed into it with
# `pip install --no-deps --no-build-isolation -e .` when `adapter_fused.kernels` does not import);
# GPU_CHECK_BUDGETS, e.g. "tests=100,models=60", overrides stage limits in seconds; GPU_CHECK_TOTAL
# overrides the limit of the whole run (455 s; a stage that no longer fits is not started).
set -u
set -o pipefail

usage="usage: bash benchmarks/gpu_check.sh [--dry-run] OUT_DIR"
DRY=""
OUT=""
for arg in "$@"; do
    case $arg in
        --dry-run) DRY=1 ;;
        -h|--help) echo "$usage"; exit 0 ;;
        -*) echo "$usage" >&2; exit 2 ;;
        *)
            if [ -n "$OUT" ]; then echo "$usage" >&2; exit 2; fi
            OUT=$arg ;;
    esac
done
if [ -z "$OUT" ]; then echo "$usage" >&2; exit 2; fi

cd "$(dirname "$0")/.." || exit 2
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd) || exit 2
LOG="$OUT/gpu_check.log"
PY=${PYTHON:-python3}

TOTAL_LIMIT=${GPU_CHECK_TOTAL:-455}   # seconds for the whole run; stages are cut to fit it
KILL_GRACE=5      # seconds between the interrupt at a stage's limit and a kill
STAGES=(install environment tests kernels models plots table)
declare -A BUDGET=([install]=30 [environment]=20 [tests]=135 [kernels]=150 [models]=90 [plots]=15 [table]=15)
declare -A RESERVE=([install]=20 [environment]=20 [tests]=20 [kernels]=20 [models]=20 [plots]=10 [table]=0)

now_ms() { date +%s%3N; }
seconds() { printf '%d.%03d' $(($1 / 1000)) $(($1 % 1000)); }   # milliseconds -> "s.mmm"

START_MS=$(now_ms)
STARTED=$(seconds "$START_MS")
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 2
trap 'rm -rf "$WORK"' EXIT

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -n "$DRY" ]; then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""   # CPU only; set before anything imports triton
else
    export TRITON_PRINT_AUTOTUNING=${TRITON_PRINT_AUTOTUNING:-1}   # tuning time and chosen config, into the log
fi

if ! [[ $TOTAL_LIMIT =~ ^[1-9][0-9]*$ ]]; then
    echo "$usage: GPU_CHECK_TOTAL must be a positive number of seconds" >&2
    exit 2
fi
if [ -n "${GPU_CHECK_BUDGETS:-}" ]; then
    IFS=',' read -r -a overrides <<< "$GPU_CHECK_BUDGETS"
    for item in "${overrides[@]}"; do
        name=${item%%=*}
        value=${item#*=}
        if [ -n "${BUDGET[$name]+set}" ] && [[ $value =~ ^[1-9][0-9]*$ ]]; then
            BUDGET[$name]=$value
        else
            echo "$usage: GPU_CHECK_BUDGETS: cannot use '$item' (STAGE=SECONDS, stages: ${STAGES[*]})" >&2
            exit 2
        fi
    done
fi

status_word() {  # exit status -> stage status
    case $1 in
        0) echo passed ;;
        3) echo skipped ;;
        124|137) echo timed-out ;;
        -) echo skipped ;;
        *) echo failed ;;
    esac
}

run_stage() {  # NAME: run `python -m benchmarks.gpu_check NAME ...` under the stage's time limit
    local name=$1
    local elapsed=$(( ($(now_ms) - START_MS) / 1000 ))
    local limit=$(( TOTAL_LIMIT - elapsed - ${RESERVE[$name]} ))
    local budget=${BUDGET[$name]}
    local least=$(( budget < 5 ? budget : 5 ))
    (( limit > budget )) && limit=$budget
    echo
    if (( limit < least )); then
        echo "=== $name: not started, ${limit} s left of the run's ${TOTAL_LIMIT} s ==="
        printf '%s\t-\t-\t%s\tnot started: no time left\n' "$name" "$limit" >> "$WORK/status.tsv"
        return
    fi
    echo "=== $name (limit ${limit} s) === $(date -u +%H:%M:%S)"
    local t0 rc
    t0=$(now_ms)
    timeout -s INT -k "$KILL_GRACE" "$limit" "$PY" -m benchmarks.gpu_check "$name" --out "$OUT" --work "$WORK" \
        --budget "$limit" --started "$STARTED" --total-limit "$TOTAL_LIMIT" ${DRY:+--dry-run} </dev/null
    rc=$?
    local secs
    secs=$(seconds $(( $(now_ms) - t0 )))
    printf '%s\t%s\t%s\t%s\t\n' "$name" "$rc" "$secs" "$limit" >> "$WORK/status.tsv"
    echo "=== $name: $(status_word "$rc") in ${secs} s (exit status $rc) ==="
}

fallback_summary() {  # gpu_check.json from the shell's own records, when the table stage did not write it
    local mode=$1 total=$2 first=1 name rc secs limit note
    {
        printf '{\n "mode": "%s",\n "complete": false,\n' "$mode"
        printf ' "note": "the table stage did not finish; stage statuses from the shell script, details in %s",\n' \
            "$(basename "$LOG")"
        printf ' "total_seconds": %s,\n "time_limit_seconds": %s,\n "stages": {' "$total" "$TOTAL_LIMIT"
        for name in "${STAGES[@]}"; do
            rc=-; secs=null; limit=null
            while IFS=$'\t' read -r n r s l note; do
                if [ "$n" = "$name" ]; then
                    rc=$r; secs=$s; limit=$l
                    [ "$secs" = - ] && secs=null
                fi
            done < "$WORK/status.tsv"
            [ $first -eq 1 ] || printf ','
            first=0
            printf '\n  "%s": {"status": "%s", "seconds": %s, "limit_seconds": %s, "exit_code": %s}' \
                "$name" "$(status_word "$rc")" "$secs" "$limit" "$([ "$rc" = - ] && echo null || echo "$rc")"
        done
        printf '\n }\n}\n'
    } > "$OUT/gpu_check.json"
}

main() {
    local mode=gpu
    [ -n "$DRY" ] && mode=dry-run
    echo "gpu_check ($mode) started $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname) in $(pwd)"
    echo "python: $(command -v "$PY" || echo "$PY not found"); output: $OUT; time limit ${TOTAL_LIMIT} s"
    local existing
    existing=$(find "$OUT" -mindepth 1 -maxdepth 1 ! -name "$(basename "$LOG")" | wc -l)
    if [ "$existing" -gt 0 ]; then
        echo "warning: $OUT already holds $existing other entries; use an empty directory to keep at most 8 files"
    fi
    : > "$WORK/status.tsv"
    local name
    for name in "${STAGES[@]}"; do
        run_stage "$name"
    done
    local total
    total=$(seconds $(( $(now_ms) - START_MS )))
    local table_rc
    table_rc=$(awk -F'\t' '$1 == "table" { print $2 }' "$WORK/status.tsv")
    if [ "$table_rc" != 0 ] || [ ! -s "$OUT/gpu_check.json" ]; then
        echo "the table stage did not finish: writing gpu_check.json from the shell's records"
        fallback_summary "$mode" "$total"
    fi
    local bad
    bad=$(awk -F'\t' '$2 != "0" && $2 != "3"' "$WORK/status.tsv" | cut -f1 | tr '\n' ' ')
    echo
    echo "files in $OUT: $(find "$OUT" -mindepth 1 -maxdepth 1 | wc -l)"
    ls -l "$OUT"
    echo "gpu_check ($mode): total wall clock ${total} s (limit ${TOTAL_LIMIT} s)"
    if [ -n "$bad" ]; then
        echo "gpu_check: stages not passed: $bad"
        return 1
    fi
    echo "gpu_check: every stage passed or was skipped"
    return 0
}

main 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
