#!/usr/bin/env bash
# The main job, offline on CPU (a few minutes on 2 cores): pretrain the GPT-2 tiny preset without
# warmup twice on the same data and seed — AdamW² (adamw_weyl) and torch's AdamW — at a
# learning rate where AdamW without warmup breaks down, then plot both. τ = 0.03 rather than the
# paper's 0.01 for GPT: τ bounds the relative change of σ1 per step, and this run has 300 steps, not
# 100K-600K (with τ = 0.01 AdamW² still wins here, by less: see the README's recipes section). Each run leaves a
# Hub-ready folder with its model card; the comparison lands in $OUT (default results/demo).
#
#   bash scripts/demo.sh [OUT]        # LR, STEPS, TAU can be overridden from the environment
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${1:-results/demo}
LR=${LR:-1e-1}
STEPS=${STEPS:-300}
TAU=${TAU:-0.03}
PY=${PYTHON:-python3}
mkdir -p "$OUT"

# Build the tiny corpus, tokenizer and packed blocks once, before the two runs read them.
"$PY" -c "from hf_weyl.recipe.presets import tiny_text_splits; tiny_text_splits()" > "$OUT/prepare.log" 2>&1

common=(--preset tiny --warmup_steps 0 --learning_rate "$LR" --max_train_steps "$STEPS" --eval_steps 50
        --max_eval_batches 16 --logging_steps 5 --with_tracking)
echo "Training two GPT-2 tiny models without warmup at lr $LR for $STEPS steps (logs: $OUT/*.log) ..."
# The two runs are small: one thread each, side by side, is faster than one after the other.
OMP_NUM_THREADS=1 "$PY" recipes/pretrain_gpt2_openwebtext.py "${common[@]}" --optimizer adamw_weyl --tau "$TAU" \
    --output_dir "$OUT/adamw_weyl" > "$OUT/adamw_weyl.log" 2>&1 &
weyl=$!
OMP_NUM_THREADS=1 "$PY" recipes/pretrain_gpt2_openwebtext.py "${common[@]}" --optimizer adamw \
    --output_dir "$OUT/adamw" > "$OUT/adamw.log" 2>&1 &
adamw=$!
status=0
wait $weyl || { echo "adamw_weyl run failed, see $OUT/adamw_weyl.log"; status=1; }
wait $adamw || { echo "adamw run failed, see $OUT/adamw.log"; status=1; }
[ $status -eq 0 ] || exit $status

"$PY" recipes/compare_runs.py "$OUT/adamw_weyl" "$OUT/adamw" --output_dir "$OUT" \
    --title "GPT-2 tiny preset, no warmup, lr $LR: AdamW² (τ=$TAU) vs AdamW"
echo
echo "Results in $OUT:"
echo "  $OUT/comparison.png            training/validation loss of both runs"
echo "  $OUT/summary.md                final metrics"
echo "  $OUT/adamw_weyl/README.md      model card (Hub-ready folder; plots in $OUT/adamw_weyl/plots/)"
echo "  $OUT/adamw/README.md           model card of the AdamW baseline"
