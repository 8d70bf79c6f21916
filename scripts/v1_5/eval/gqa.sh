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
#      of MODEL_PATH); MODEL_BASE: base LLM of a LoRA checkpoint; CONV_MODE (default: the checkpoint's
#      own template, config.conv_template); DATA_ROOT (default ./playground/data/eval); GPULIST:
#      comma-separated GPU ids, one chunk of the questions per GPU (default: $CUDA_VISIBLE_DEVICES,
#      else 0); PYTHON (default python). A failed chunk fails the script once the others have finished.
source "$(dirname "$0")/common.sh"
SPLIT=llava_gqa_testdev_balanced
GQADIR=$DATA_ROOT/gqa
ANSWER_DIR=$GQADIR/answers/$SPLIT/$NAME
run_chunked llava.eval.model_vqa_loader "$ANSWER_DIR" \
    --question-file "$GQADIR/$SPLIT.jsonl" \
    --image-folder "$GQADIR/data/images"
output_file=$ANSWER_DIR/merge.jsonl

"$PYTHON" -m llava.eval.eval_gqa \
    --question-file "$GQADIR/data/testdev_balanced_questions.json" \
    --result-file "$output_file" \
    --convert-to "$GQADIR/data/testdev_balanced_predictions.json" \
    --output-result "$ANSWER_DIR/result.json"
