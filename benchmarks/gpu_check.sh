#!/usr/bin/env bash
# One command for a short GPU window: environment, GPU tests, the headline kernel and model benchmarks,
# plots and the targets table, each stage under its own time limit within 455 s (benchmarks/gpu_check.py).
#
#   bash benchmarks/gpu_check.sh OUT_DIR              on a machine with a CUDA GPU
#   bash benchmarks/gpu_check.sh --dry-run OUT_DIR    on a CPU: every stage through Triton's interpreter
#                                                     at tiny sizes (checks the plumbing, not the speed)
#   options: --total SECONDS, --budgets STAGE=SECONDS,..., --stages STAGE,...  (see --help)
#
# OUT_DIR receives at most 8 flat files: gpu_check.log, gpu_check.json (each stage's status, reason and
# seconds; environment, test counts, targets table), gpu_check_junit.xml, adapter_bench_<device>_<date>.json
# (the schema of `python -m benchmarks --out`) and its two plots. Exit status: 0 when every stage passed or
# had nothing to do, 1 otherwise, 2 for a usage error. PYTHON names the interpreter (default python3).
root=$(cd "$(dirname "$0")/.." && pwd) || exit 2
PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" exec "${PYTHON:-python3}" -m benchmarks.gpu_check "$@"
