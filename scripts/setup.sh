#!/usr/bin/env bash
# One-time set-up on a fresh machine, into the project's own virtual environment .venv (made here, or reused):
# CPU torch first (so nothing pulls a multi-GB CUDA build), then hf_weyl with its DeepSpeed, recipe and test
# extras. The system Python is only used to make the venv. The other scripts (demo.sh, test.sh, check_wheel.sh)
# run in .venv; PYTHON=/path/to/python makes all of them use another interpreter instead (no venv is made).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    BASE=${BASE_PYTHON:-python3}
    if [ ! -x .venv/bin/python ]; then
        echo "setup: making the virtual environment .venv with $("$BASE" --version 2>&1) ($(command -v "$BASE"))"
        "$BASE" -m venv .venv
    else
        echo "setup: reusing the virtual environment .venv ($(.venv/bin/python --version 2>&1))"
    fi
fi
source scripts/env.sh
echo "setup: installing torch 2.13.0 (CPU build) and hf_weyl[dev] into $("$PY" -c 'import sys; print(sys.prefix)')"
"$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q -e ".[dev]"
echo "setup: done; the scripts run with $PY"
