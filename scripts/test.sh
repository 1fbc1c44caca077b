#!/usr/bin/env bash
# The test suite: offline, CPU, including 2-rank DeepSpeed and FSDP runs over gloo.
#   bash scripts/test.sh                          # everything (pyproject's testpaths: tests/)
#   bash scripts/test.sh tests/test_fsdp.py -x    # or what you name
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh  # PY: the project venv's python (or $PYTHON)
export DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PY" -m pytest "$@"
