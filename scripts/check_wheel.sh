#!/usr/bin/env bash
# The wheel is complete: build it from this checkout, install it alone (no source tree on the path) and run a
# recipe preset end to end from a temporary directory. Fails unless the run writes its model card (README.md,
# rendered from the template shipped in the wheel), its metrics and its plots. About a minute on 2 CPU cores.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
source "$ROOT/scripts/env.sh"  # PY: the project venv's python (or $PYTHON)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# 1. build (the installed setuptools when recent enough, else pip's isolated build environment)
ISOLATION=()
if "$PY" -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 77)" 2>/dev/null; then
    ISOLATION=(--no-build-isolation)
fi
mkdir "$WORK/src"  # from a copy of the checkout's files: no stale build/ in the wheel, nothing left in the repo
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
        | tar --null --ignore-failed-read -cf - -T - 2>/dev/null) | tar -xf - -C "$WORK/src"
else
    (cd "$ROOT" && tar --exclude=./build --exclude='*.egg-info' --exclude=./.git -cf - .) | tar -xf - -C "$WORK/src"
fi
"$PY" -m pip wheel -q --no-deps "${ISOLATION[@]}" -w "$WORK/dist" "$WORK/src"
WHEEL=$(ls "$WORK"/dist/hf_weyl-*.whl)

# 2. the files that live outside Python modules are in it
"$PY" - "$WHEEL" <<'PYEOF'
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
need = ["hf_weyl/__main__.py", "hf_weyl/recipe/model_cards/adamw_weyl_recipe.md", "hf_weyl/core/csrc/weyl_cpu.cpp",
        "hf_weyl/recipe/metrics/accuracy/accuracy.py", "hf_weyl/recipe/metrics/perplexity/perplexity.py",
        f"hf_weyl-{sys.argv[1].rsplit('/', 1)[-1].split('-')[1]}.dist-info/licenses/LICENSE"]
missing = [n for n in need if n not in names]
if missing:
    sys.exit(f"check_wheel: {sys.argv[1]} lacks {missing}")
PYEOF

# 3. install it alone and run a recipe, copied out of the repo, against it
"$PY" -m pip install -q --no-deps --target "$WORK/site" "$WHEEL"
mkdir "$WORK/run"
cp "$ROOT/recipes/pretrain_gpt2_openwebtext.py" "$WORK/run/"
cd "$WORK/run"
export PYTHONPATH="$WORK/site" DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false HF_DATASETS_CACHE="$WORK/hf_datasets" HF_EVALUATE_CACHE="$WORK/hf_evaluate"
"$PY" -c "
import hf_weyl, sys
if not hf_weyl.__file__.startswith('$WORK/site/'):
    sys.exit(f'check_wheel: hf_weyl imported from {hf_weyl.__file__}, not from the installed wheel')
"
"$PY" pretrain_gpt2_openwebtext.py --preset tiny --output_dir out --max_train_steps 3 --eval_steps 3 \
    --max_eval_batches 1 --logging_steps 1 > run.log 2>&1 || { tail -40 run.log; echo "check_wheel: the recipe failed"; exit 1; }

# 4. the card, the metrics and the plots were written
for f in README.md all_results.json model.safetensors plots/loss.png plots/cap.png; do
    [ -s "out/$f" ] || { tail -20 run.log; echo "check_wheel: out/$f not written"; exit 1; }
done
grep -q "AdamW²" out/README.md && grep -q "| optimizer | adamw_weyl |" out/README.md \
    || { echo "check_wheel: out/README.md is not the rendered model card"; exit 1; }
echo "check_wheel: $(basename "$WHEEL") installed alone ran the tiny GPT-2 recipe and wrote its model card"
