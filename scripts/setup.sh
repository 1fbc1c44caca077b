#!/usr/bin/env bash
# One-time set-up on a fresh machine: CPU torch first (so nothing pulls a multi-GB CUDA build),
# then hf_weyl with its DeepSpeed, recipe and test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q -e ".[dev]"
