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
#      of MODEL_PATH); MODEL_BASE: base LLM of a LoRA checkpoint; CONV_MODE (default: the checkpoint's
#      own template, config.conv_template); DATA_ROOT (default ./playground/data/eval); GPULIST:
#      comma-separated GPU ids, one chunk of the questions per GPU (default: $CUDA_VISIBLE_DEVICES,
#      else 0); PYTHON (default python). A failed chunk fails the script once the others have finished.
source "$(dirname "$0")/common.sh"
TEXTVQA=$DATA_ROOT/textvqa
ANSWER_DIR=$TEXTVQA/answers/$NAME
run_chunked llava.eval.model_vqa_loader "$ANSWER_DIR" \
    --question-file "$TEXTVQA/llava_textvqa_val_v051_ocr.jsonl" \
    --image-folder "$TEXTVQA/train_images"
output_file=$ANSWER_DIR/merge.jsonl

"$PYTHON" -m llava.eval.eval_textvqa \
    --annotation-file "$TEXTVQA/TextVQA_0.5.1_val.json" \
    --result-file "$output_file" \
    --output-result "$ANSWER_DIR/result.json"
