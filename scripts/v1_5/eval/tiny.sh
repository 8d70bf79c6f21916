#!/bin/bash
# Tiny-world evaluation, LLaVA's eval-script style: answer the split with model_vqa_loader (greedy, one
# chunk of the questions per GPU, one chunk on CPU), merge, then score per question family with
# `python -m llava.eval.eval_tiny` (accuracy per family and overall, as a markdown table).
# Writes $WORLD/eval/answers/$SPLIT/$NAME/{merge.jsonl,results.json,results.md}.
#
# Usage: CKPT=./checkpoints/llava-qwen2-tiny-aligntI bash scripts/v1_5/eval/tiny.sh
# Env: CKPT (or MODEL_PATH): checkpoint folder or hub id; MODEL_BASE: base LLM of a projector-only / LoRA checkpoint;
#      WORLD: tiny world folder (default playground/tiny/data, made by `python -m llava.tiny.preset prepare`);
#      SPLIT: test or val; NAME: table row and answers subfolder (default: basename of CKPT);
#      CONV_MODE (default: the checkpoint's conv_template); BATCH: questions per generate call (default 8);
#      DEVICE: cuda or cpu (default: cuda when available); GPULIST: comma-separated GPU ids (default:
#      $CUDA_VISIBLE_DEVICES, else 0); PYTHON (default python). A failed chunk fails the script once the
#      others have finished.
set -euo pipefail

CKPT=${CKPT:-${MODEL_PATH:-./checkpoints/llava-qwen2-tiny-aligntI}}
WORLD=${WORLD:-playground/tiny/data}
SPLIT=${SPLIT:-test}
NAME=${NAME:-$(basename "$CKPT")}
BATCH=${BATCH:-8}
PYTHON=${PYTHON:-python}

# a folder, or a hub id (org/name[@revision]: resolved by the loader through the Hugging Face cache)
if [ ! -d "$CKPT" ] && ! [[ "$CKPT" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@.+)?$ ]]; then
    echo "CKPT=$CKPT is not a checkpoint folder (nor a hub id org/name): set CKPT" >&2; exit 1
fi
if [ ! -f "$WORLD/${SPLIT}_questions.jsonl" ]; then
    echo "$WORLD/${SPLIT}_questions.jsonl not found: set WORLD or run" \
        "'python -m llava.tiny.preset prepare'" >&2; exit 1
fi

DEVICE=${DEVICE:-$("$PYTHON" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}
if [ "$DEVICE" = "cuda" ]; then GPULIST=${GPULIST:-${CUDA_VISIBLE_DEVICES:-0}}; else GPULIST=cpu; fi
IFS=',' read -ra GPUS <<< "$GPULIST"
CHUNKS=${#GPUS[@]}
ANSWER_DIR=$WORLD/eval/answers/$SPLIT/$NAME
mkdir -p "$ANSWER_DIR"

pids=()
for IDX in $(seq 0 $((CHUNKS-1))); do
    if [ "$DEVICE" = "cuda" ]; then export CUDA_VISIBLE_DEVICES=${GPUS[$IDX]}; fi
    "$PYTHON" -m llava.eval.model_vqa_loader \
        --model-path "$CKPT" ${MODEL_BASE:+--model-base "$MODEL_BASE"} \
        --question-file "$WORLD/${SPLIT}_questions.jsonl" \
        --image-folder "$WORLD/images" \
        --answers-file "$ANSWER_DIR/${CHUNKS}_${IDX}.jsonl" \
        --num-chunks "$CHUNKS" \
        --chunk-idx "$IDX" \
        --temperature 0 \
        --batch-size "$BATCH" \
        --device "$DEVICE" \
        ${CONV_MODE:+--conv-mode "$CONV_MODE"} &
    pids+=($!)
done
failed=()
for IDX in "${!pids[@]}"; do wait "${pids[$IDX]}" || failed+=("$IDX"); done  # every chunk ends first
if [ "${#failed[@]}" -gt 0 ]; then
    echo "chunk(s) ${failed[*]} of $CHUNKS failed: no merge, no score" >&2; exit 1
fi

output_file=$ANSWER_DIR/merge.jsonl
> "$output_file"
for IDX in $(seq 0 $((CHUNKS-1))); do
    cat "$ANSWER_DIR/${CHUNKS}_${IDX}.jsonl" >> "$output_file"
done

"$PYTHON" -m llava.eval.eval_tiny \
    --question-file "$WORLD/${SPLIT}_questions.jsonl" \
    --answers-file "$output_file" \
    --name "$NAME" \
    --output-json "$ANSWER_DIR/results.json" \
    --output-md "$ANSWER_DIR/results.md"
