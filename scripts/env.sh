# Sourced by the other scripts: the project's own virtual environment, .venv at the repository root, so that
# nothing is installed into (or read from) the system Python. PYTHON=/path/to/python overrides it.
_HF_WEYL_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
    if [ ! -x "$_HF_WEYL_ROOT/.venv/bin/python" ]; then
        echo "hf_weyl: no virtual environment at $_HF_WEYL_ROOT/.venv; run 'bash scripts/setup.sh' first" >&2
        exit 2
    fi
    PYTHON="$_HF_WEYL_ROOT/.venv/bin/python"
fi
PY=$PYTHON
