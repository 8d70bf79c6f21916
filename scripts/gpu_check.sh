#!/usr/bin/env bash
# GPU check (issue 16): on a CUDA machine, every CUDA-only test (FlexAttention BlockMask forward and backward,
# the flex paths of the attention hook, IVA and the builder, bf16) and the step / TPA benchmarks at the real
# sizes (Qwen2-0.5B-shaped student, Qwen2-7B-shaped teacher, vocab 151936/152064, bf16) with sdpa and
# flex_attention, within about 8 minutes. Writes one JSON file of results:
#
#   bash scripts/gpu_check.sh [OUT_DIR]        # default ./gpu_check; results in OUT_DIR/gpu_check.json
#
# Refuses to run without CUDA. Each part has its own time limit, so one slow part cannot eat the others'.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-./gpu_check}"
PY="${PYTHON:-$(bash scripts/bootstrap.sh dev | tail -n 1)}"
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no CUDA device visible to torch (torch.cuda.is_available() is False); run it on a GPU machine" >&2
    exit 1
fi
mkdir -p "$OUT"
export TOKENIZERS_PARALLELISM=false

part() {  # part NAME SECONDS CMD...: run CMD under a time limit, its output in OUT/NAME.log, its status in OUT/NAME.rc
    local name="$1" limit="$2"; shift 2
    echo "[gpu_check] $name (at most ${limit} s)"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo $? > "$OUT/$name.rc"
    tail -n 3 "$OUT/$name.log"
}

# The tests that skip without CUDA, in the files that hold them (the CPU ones there run too: seconds).
part tests 180 "$PY" -m pytest -q -rs -p no:cacheprovider --junitxml="$OUT/tests.xml" \
    tests/test_tpa.py tests/test_iva_irs.py tests/test_attention_hook.py tests/test_builder.py
REAL=(--real --warmup 1 --iters 3)
part bench_step_sdpa 120 "$PY" benchmarks/bench_step.py "${REAL[@]}" --attn sdpa --json "$OUT/bench_step_sdpa.json"
part bench_step_flex 120 "$PY" benchmarks/bench_step.py "${REAL[@]}" --attn flex_attention \
    --json "$OUT/bench_step_flex.json"
TPA=(--device cuda --dtype bfloat16 --batch 1 --vocab 151936 --student-hidden 896 --student-layers 24
     --teacher-hidden 3584 --teacher-layers 28 --warmup 1 --iters 5)
part bench_tpa_sdpa 60 "$PY" benchmarks/bench_tpa.py "${TPA[@]}" --attn sdpa
part bench_tpa_flex 60 "$PY" benchmarks/bench_tpa.py "${TPA[@]}" --attn flex_attention

"$PY" benchmarks/gpu_check_report.py "$OUT"
