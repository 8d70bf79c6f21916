# Sourced by the benchmark scripts in this folder: shared settings and the chunk-per-GPU loop.
# Env: MODEL_PATH (or CKPT), NAME (default: basename of MODEL_PATH), MODEL_BASE, CONV_MODE (qwen_2),
#      DATA_ROOT (./playground/data/eval), GPULIST (default $CUDA_VISIBLE_DEVICES, else 0), PYTHON (python).
set -euo pipefail
MODEL_PATH=${MODEL_PATH:-${CKPT:-./checkpoints/llava-qwen-aligntI}}
NAME=${NAME:-$(basename "$MODEL_PATH")}
CONV_MODE=${CONV_MODE:-qwen_2}
DATA_ROOT=${DATA_ROOT:-./playground/data/eval}
GPULIST=${GPULIST:-${CUDA_VISIBLE_DEVICES:-0}}
PYTHON=${PYTHON:-python}
IFS=',' read -ra GPUS <<< "$GPULIST"
CHUNKS=${#GPUS[@]}

# run_chunked MODULE ANSWER_DIR ARGS...: one chunk of the questions per GPU, greedy, then
# ANSWER_DIR/merge.jsonl. Stops (non-zero) if any chunk fails.
run_chunked() {
    local module="$1" answer_dir="$2"; shift 2
    mkdir -p "$answer_dir"
    local pids=() idx
    for idx in $(seq 0 $((CHUNKS-1))); do
        CUDA_VISIBLE_DEVICES=${GPUS[$idx]} $PYTHON -m "$module" \
            --model-path "$MODEL_PATH" ${MODEL_BASE:+--model-base "$MODEL_BASE"} \
            --answers-file "$answer_dir/${CHUNKS}_${idx}.jsonl" --num-chunks "$CHUNKS" --chunk-idx "$idx" \
            --temperature 0 --conv-mode "$CONV_MODE" "$@" &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid"; done
    : > "$answer_dir/merge.jsonl"
    for idx in $(seq 0 $((CHUNKS-1))); do
        cat "$answer_dir/${CHUNKS}_${idx}.jsonl" >> "$answer_dir/merge.jsonl"
    done
}
