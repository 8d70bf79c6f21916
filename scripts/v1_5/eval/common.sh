# Sourced by the benchmark scripts in this folder: shared settings and the chunk-per-GPU loop.
# Env: MODEL_PATH (or CKPT), NAME (default: basename of MODEL_PATH), MODEL_BASE, CONV_MODE (default: the
#      checkpoint's own template, config.conv_template), DATA_ROOT (./playground/data/eval), GPULIST (default
#      $CUDA_VISIBLE_DEVICES, else 0), PYTHON (python).
set -euo pipefail
MODEL_PATH=${MODEL_PATH:-${CKPT:-./checkpoints/llava-qwen-aligntI}}
NAME=${NAME:-$(basename "$MODEL_PATH")}
DATA_ROOT=${DATA_ROOT:-./playground/data/eval}
GPULIST=${GPULIST:-${CUDA_VISIBLE_DEVICES:-0}}
PYTHON=${PYTHON:-python}
IFS=',' read -ra GPUS <<< "$GPULIST"
CHUNKS=${#GPUS[@]}

# run_chunked MODULE ANSWER_DIR ARGS...: one chunk of the questions per GPU, greedy, then
# ANSWER_DIR/merge.jsonl. If a chunk fails, the others still finish, then it stops (non-zero).
run_chunked() {
    local module="$1" answer_dir="$2"; shift 2
    mkdir -p "$answer_dir"
    local pids=() failed=() idx
    for idx in $(seq 0 $((CHUNKS-1))); do
        CUDA_VISIBLE_DEVICES=${GPUS[$idx]} "$PYTHON" -m "$module" \
            --model-path "$MODEL_PATH" ${MODEL_BASE:+--model-base "$MODEL_BASE"} \
            --answers-file "$answer_dir/${CHUNKS}_${idx}.jsonl" --num-chunks "$CHUNKS" --chunk-idx "$idx" \
            --temperature 0 ${CONV_MODE:+--conv-mode "$CONV_MODE"} "$@" &
        pids+=($!)
    done
    for idx in "${!pids[@]}"; do
        wait "${pids[$idx]}" || failed+=("$idx")
    done
    if [ "${#failed[@]}" -gt 0 ]; then
        echo "chunk(s) ${failed[*]} of $CHUNKS failed: no merge, no score" >&2
        return 1
    fi
    : > "$answer_dir/merge.jsonl"
    for idx in $(seq 0 $((CHUNKS-1))); do
        cat "$answer_dir/${CHUNKS}_${idx}.jsonl" >> "$answer_dir/merge.jsonl"
    done
}
