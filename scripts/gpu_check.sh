#!/usr/bin/env bash
# One command that checks hf_weyl on a GPU (about 5-8 minutes on one GPU) and writes one markdown report:
#   1. the device-parametrised tests (tests/test_device.py: AdamWeyl = AdamW(fused=True) when the cap cannot bind,
#      fp32/bf16; cap tightness; state_dict round trip; capturable in a CUDA graph) on CUDA and CPU, and the
#      accelerator step's tests (tests/test_accelerator_step.py: ops per step, batched products, capturable,
#      torch.compile without graph breaks);
#   2. benchmarks/optimizer_step.py on the GPU: AdamWeyl (eager, compiled, captured in a CUDA graph) vs AdamW fused
#      and foreach, GPT-2 small and a 1.3B-shaped parameter set, fp32 and bf16, ms and ratios; ops per step;
#   3. short training runs (scripts/gpu_check.py): the Trainer with optim="adamw_weyl", DeepSpeed ZeRO-2 on one GPU
#      (NCCL, world size 1) and FSDP2 on one rank, cap binding;
#   4. the demo (scripts/demo.sh) at GPU speed.
# Without a GPU it runs what it can on the CPU (the tests on the CPU, a small benchmark regime, the three runs over
# gloo), skips the rest and says so in the report; CI runs it that way so that it cannot rot. Exit status 1 if any
# stage failed (a skipped stage is not a failure).
#
#   bash scripts/gpu_check.sh [OUT]      # report: OUT/report.md (default results/gpu_check), logs beside it
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh  # PY: the project venv's python (or $PYTHON)
OUT=${1:-results/gpu_check}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else '')" 2>/dev/null)
if [ -z "$GPU" ]; then
    export DS_ACCELERATOR=cpu
    echo "gpu_check: no GPU here: running the CPU parts only (the report says what was skipped)"
fi
REPORT="$OUT/report.md"
rows=()
failed=0

stage() {  # name, timeout in s, command...: runs it, logs to OUT/<name>.log, adds a row
    local name=$1 limit=$2; shift 2
    local log="$OUT/$name.log" start=$SECONDS status
    echo "gpu_check: $name ..."
    timeout "$limit" "$@" > "$log" 2>&1
    status=$?
    local took=$((SECONDS - start))
    if [ $status -eq 0 ]; then
        rows+=("| $name | ok | $took s | \`$*\` |")
    else
        [ $status -eq 124 ] && echo "(timed out after $limit s)" >> "$log"
        rows+=("| $name | **FAILED** (exit $status) | $took s | \`$*\` |")
        failed=1
        echo "gpu_check: $name failed (exit $status); see $log"
    fi
}

skip() {  # name, why
    rows+=("| $1 | skipped | | $2 |")
}

port() { echo $((29500 + RANDOM % 400)); }

stage device_tests 600 "$PY" -m pytest tests/test_device.py -q -rs -p no:cacheprovider
stage accelerator_step 600 "$PY" -m pytest tests/test_accelerator_step.py -q -rs -p no:cacheprovider
stage optimizer_ops 300 "$PY" benchmarks/optimizer_step.py --count_ops --regimes gpt2_small
if [ -n "$GPU" ]; then
    stage optimizer_step 600 "$PY" benchmarks/optimizer_step.py --device cuda --regimes gpt2_small gpt_1p3b \
        --dtypes fp32 bf16 --steps 10
else
    stage optimizer_step 600 "$PY" benchmarks/optimizer_step.py --device cpu --regimes width64 --dtypes fp32 --steps 3
    skip "optimizer_step (GPU)" "no GPU: GPT-2 small and the 1.3B shape on CUDA (eager, compiled, CUDA graph) not measured"
fi
stage trainer 300 "$PY" scripts/gpu_check.py trainer
stage zero2 300 "$PY" -m torch.distributed.run --nproc_per_node 1 --master_port "$(port)" scripts/gpu_check.py zero2
stage fsdp2 300 "$PY" -m torch.distributed.run --nproc_per_node 1 --master_port "$(port)" scripts/gpu_check.py fsdp2
if [ -n "$GPU" ]; then
    stage demo 900 bash scripts/demo.sh "$OUT/demo"
else
    skip demo "no GPU: the demo is the main job on the CPU (bash scripts/demo.sh)"
fi

{
    echo "# hf_weyl GPU check"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), device: ${GPU:-none (CPU only)}, $("$PY" -c 'import torch; print("torch", torch.__version__)')"
    echo
    echo "| stage | result | time | command or reason |"
    echo "|---|---|---|---|"
    printf '%s\n' "${rows[@]}"
    for log in "$OUT"/*.log; do
        echo
        echo "## $(basename "$log" .log)"
        echo
        echo '```'
        grep -v "^WARNING\|FutureWarning\|warnings.warn" "$log" | tail -n 40
        echo '```'
    done
} > "$REPORT"
echo "gpu_check: report in $REPORT"
exit $failed
