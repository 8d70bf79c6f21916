#!/bin/bash
# GQA testdev-balanced (12,578 questions), LLaVA-1.5 protocol: one short answer per question, greedy
# decoding, exact-match accuracy (`python -m llava.eval.eval_gqa`).
#
# Data: images and questions from https://cs.stanford.edu/people/dorarad/gqa/download.html
# (images.zip, questions1.2.zip -> testdev_balanced_questions.json); the LLaVA question list
# llava_gqa_testdev_balanced.jsonl from LLaVA's eval.zip (see LLaVA's docs/Evaluation.md).
# Layout under $DATA_ROOT/gqa:
#   llava_gqa_testdev_balanced.jsonl
#   data/images/<imageId>.jpg
#   data/testdev_balanced_questions.json
# Writes answers/$SPLIT/$NAME/{merge.jsonl,result.json} and data/testdev_balanced_predictions.json
# (GQA's submission format, for its official eval.py).
#
# Usage: MODEL_PATH=./checkpoints/my-model GPULIST=0,1,2,3 bash scripts/v1_5/eval/gqa.sh
# Env: MODEL_PATH (or CKPT): checkpoint folder or hub id; NAME: answers subfolder (default: basename
#      of MODEL_PATH); MODEL_BASE: base LLM of a LoRA checkpoint; CONV_MODE (default qwen_2);
#      DATA_ROOT (default ./playground/data/eval); GPULIST: comma-separated GPU ids, one chunk of
#      the questions per GPU (default: $CUDA_VISIBLE_DEVICES, else 0); PYTHON (default python).
set -euo pipefail

MODEL_PATH=${MODEL_PATH:-${CKPT:-./checkpoints/llava-qwen-aligntI}}
NAME=${NAME:-$(basename "$MODEL_PATH")}
CONV_MODE=${CONV_MODE:-qwen_2}
DATA_ROOT=${DATA_ROOT:-./playground/data/eval}
GPULIST=${GPULIST:-${CUDA_VISIBLE_DEVICES:-0}}
PYTHON=${PYTHON:-python}

IFS=',' read -ra GPUS <<< "$GPULIST"
CHUNKS=${#GPUS[@]}
SPLIT=llava_gqa_testdev_balanced
GQADIR=$DATA_ROOT/gqa
ANSWER_DIR=$GQADIR/answers/$SPLIT/$NAME
mkdir -p "$ANSWER_DIR"

pids=()
for IDX in $(seq 0 $((CHUNKS-1))); do
    CUDA_VISIBLE_DEVICES=${GPUS[$IDX]} $PYTHON -m llava.eval.model_vqa_loader \
        --model-path "$MODEL_PATH" ${MODEL_BASE:+--model-base "$MODEL_BASE"} \
        --question-file "$GQADIR/$SPLIT.jsonl" \
        --image-folder "$GQADIR/data/images" \
        --answers-file "$ANSWER_DIR/${CHUNKS}_${IDX}.jsonl" \
        --num-chunks "$CHUNKS" \
        --chunk-idx "$IDX" \
        --temperature 0 \
        --conv-mode "$CONV_MODE" &
    pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done  # stop here if any chunk failed

output_file=$ANSWER_DIR/merge.jsonl
> "$output_file"
for IDX in $(seq 0 $((CHUNKS-1))); do
    cat "$ANSWER_DIR/${CHUNKS}_${IDX}.jsonl" >> "$output_file"
done

$PYTHON -m llava.eval.eval_gqa \
    --question-file "$GQADIR/data/testdev_balanced_questions.json" \
    --result-file "$output_file" \
    --convert-to "$GQADIR/data/testdev_balanced_predictions.json" \
    --output-result "$ANSWER_DIR/result.json"
