#!/usr/bin/env bash
# Set up a local virtual environment when it is missing or out of date, then run a command in it.
#
#   ./run.sh report [ARGS...]   the main job: python -m adapter_fused ARGS (--help for its options)
#   ./run.sh test [ARGS...]     the test suite: python -m pytest ARGS; without ARGS, tests/ with its files
#                               spread over every CPU core (pytest-xdist: -n auto --dist loadfile)
#
# Set-up (skipped when a stamp in the environment says it is done for this pyproject.toml):
#   - creates the environment with python3 (ADAPTER_FUSED_VENV, default .venv);
#   - installs torch: ADAPTER_FUSED_TORCH when set (pip arguments: a requirement such as 'torch==2.11.0',
#     optionally followed by --index-url URL), else 'torch' where nvidia-smi finds a GPU and
#     'torch==2.13.0' otherwise;
#   - installs this package in editable mode with the extras the command needs.
set -euo pipefail
cd "$(dirname "$0")"

usage="usage: ./run.sh report|test [ARGS...]"
[ $# -ge 1 ] || { echo "$usage" >&2; exit 2; }
command=$1
shift
case $command in
    report) extras="" ;;
    test) extras="[test,bench,hf,docs,quant,export]" ;;
    *) echo "$usage" >&2; exit 2 ;;
esac

venv=${ADAPTER_FUSED_VENV:-.venv}
if [ -n "${ADAPTER_FUSED_TORCH:-}" ]; then
    torch=$ADAPTER_FUSED_TORCH
elif nvidia-smi >/dev/null 2>&1; then
    torch=torch
else
    torch=torch==2.13.0
fi

stamp="$venv/.adapter-fused-$command"
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $torch $extras"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "run.sh: setting up $venv ($torch, adapter-fused$extras)" >&2
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    # shellcheck disable=SC2086  # split on purpose: the torch choice may carry pip options
    "$venv/bin/python" -m pip install --quiet $torch
    "$venv/bin/python" -m pip install --quiet -e ".$extras"
    echo "$want" >"$stamp"
fi

# shellcheck disable=SC1091
. "$venv/bin/activate"
case $command in
    report) exec python -m adapter_fused "$@" ;;
    test)
        # pyproject.toml's testpaths: tests/ when no path is given
        if [ $# -eq 0 ] && python -c "import xdist" 2>/dev/null; then
            set -- -n auto --dist loadfile
        fi
        exec python -m pytest "$@" ;;
esac
