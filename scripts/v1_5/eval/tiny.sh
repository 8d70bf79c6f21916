#!/bin/bash
# Tiny-world evaluation (LLaVA's eval-script style): answer the test split with model_vqa_loader,
# one chunk per visible GPU (one chunk on CPU), merge, then score per question family with eval_tiny.
#   CKPT=./checkpoints/llava-qwen2-tiny-aligntI bash scripts/v1_5/eval/tiny.sh
# Env overrides: CKPT (checkpoint folder), MODEL_BASE (for projector-only / LoRA checkpoints),
# WORLD (tiny world folder), SPLIT (test|val), NAME (table row), CONV_MODE (default: the checkpoint's),
# BATCH (questions per generate call), DEVICE (cuda|cpu), PYTHON.
set -euo pipefail

CKPT=${CKPT:-./checkpoints/llava-qwen2-tiny-aligntI}
MODEL_BASE=${MODEL_BASE:-}
WORLD=${WORLD:-playground/tiny/data}
SPLIT=${SPLIT:-test}
NAME=${NAME:-$(basename "$CKPT")}
CONV_MODE=${CONV_MODE:-}
BATCH=${BATCH:-8}
PYTHON=${PYTHON:-python}
if [ -z "${DEVICE:-}" ]; then
    DEVICE=$("$PYTHON" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')
fi

if [ ! -d "$CKPT" ]; then
    echo "CKPT=$CKPT is not a checkpoint folder: set CKPT" >&2; exit 1
fi
if [ ! -f "$WORLD/${SPLIT}_questions.jsonl" ]; then
    echo "$WORLD/${SPLIT}_questions.jsonl not found: set WORLD or run" \
        "'python -m llava.tiny.preset prepare'" >&2; exit 1
fi

if [ "$DEVICE" = "cuda" ]; then
    gpu_list="${CUDA_VISIBLE_DEVICES:-$(nvidia-smi --query-gpu=index --format=csv,noheader | paste -sd, -)}"
else
    gpu_list="cpu"
fi
IFS=',' read -ra GPULIST <<< "$gpu_list"
CHUNKS=${#GPULIST[@]}

ANSWERS=$WORLD/eval/answers/$SPLIT/$NAME
extra=()
[ -n "$MODEL_BASE" ] && extra+=(--model-base "$MODEL_BASE")
[ -n "$CONV_MODE" ] && extra+=(--conv-mode "$CONV_MODE")

pids=()
for IDX in $(seq 0 $((CHUNKS-1))); do
    if [ "$DEVICE" = "cuda" ]; then export CUDA_VISIBLE_DEVICES=${GPULIST[$IDX]}; fi
    "$PYTHON" -m llava.eval.model_vqa_loader \
        --model-path "$CKPT" \
        --question-file "$WORLD/${SPLIT}_questions.jsonl" \
        --image-folder "$WORLD/images" \
        --answers-file "$ANSWERS/${CHUNKS}_${IDX}.jsonl" \
        --num-chunks "$CHUNKS" \
        --chunk-idx "$IDX" \
        --temperature 0 \
        --batch-size "$BATCH" \
        --device "$DEVICE" \
        ${extra[@]+"${extra[@]}"} &
    pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done  # fail if any chunk failed

output_file=$ANSWERS/merge.jsonl
> "$output_file"
for IDX in $(seq 0 $((CHUNKS-1))); do
    cat "$ANSWERS/${CHUNKS}_${IDX}.jsonl" >> "$output_file"
done

"$PYTHON" -m llava.eval.eval_tiny \
    --question-file "$WORLD/${SPLIT}_questions.jsonl" \
    --answers-file "$output_file" \
    --name "$NAME" \
    --output-json "$ANSWERS/results.json" \
    --output-md "$ANSWERS/results.md"
