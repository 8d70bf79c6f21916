#!/bin/bash
# TextVQA val (5,000 questions), LLaVA-1.5 protocol: questions with the reference OCR tokens in the
# prompt, greedy decoding, standard VQA soft accuracy (`python -m llava.eval.eval_textvqa`).
#
# Data: TextVQA_0.5.1_val.json and train_val_images.zip from https://textvqa.org/dataset
# (dl.fbaipublicfiles.com/textvqa/...); the question list llava_textvqa_val_v051_ocr.jsonl from
# LLaVA's eval.zip (see LLaVA's docs/Evaluation.md).
# Layout under $DATA_ROOT/textvqa:
#   llava_textvqa_val_v051_ocr.jsonl
#   TextVQA_0.5.1_val.json
#   train_images/<image_id>.jpg
# Writes answers/$NAME/{merge.jsonl,result.json}.
#
# Usage: MODEL_PATH=./checkpoints/my-model GPULIST=0,1,2,3 bash scripts/v1_5/eval/textvqa.sh
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
TEXTVQA=$DATA_ROOT/textvqa
ANSWER_DIR=$TEXTVQA/answers/$NAME
mkdir -p "$ANSWER_DIR"

pids=()
for IDX in $(seq 0 $((CHUNKS-1))); do
    CUDA_VISIBLE_DEVICES=${GPUS[$IDX]} $PYTHON -m llava.eval.model_vqa_loader \
        --model-path "$MODEL_PATH" ${MODEL_BASE:+--model-base "$MODEL_BASE"} \
        --question-file "$TEXTVQA/llava_textvqa_val_v051_ocr.jsonl" \
        --image-folder "$TEXTVQA/train_images" \
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

$PYTHON -m llava.eval.eval_textvqa \
    --annotation-file "$TEXTVQA/TextVQA_0.5.1_val.json" \
    --result-file "$output_file" \
    --output-result "$ANSWER_DIR/result.json"
