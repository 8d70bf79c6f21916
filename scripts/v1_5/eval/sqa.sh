#!/bin/bash
# ScienceQA test (4,241 problems; the paper's SQA column is the IMG subset, 2,017 with an image),
# LLaVA-1.5 protocol: "Answer with the option's letter from the given choices directly.", greedy
# decoding, letter accuracy (`python -m llava.eval.eval_science_qa`).
#
# Data: problems.json, pid_splits.json and the test images from https://github.com/lupantech/ScienceQA
# (data/scienceqa; images from its download script); LLaVA's question file llava_test_CQM-A.json
# from LLaVA's eval.zip (see LLaVA's docs/Evaluation.md).
# Layout under $DATA_ROOT/scienceqa:
#   llava_test_CQM-A.json
#   problems.json
#   pid_splits.json
#   images/test/<pid>/image.png
# Writes answers/$NAME/{merge.jsonl,result.json,per_question.json}.
#
# Usage: MODEL_PATH=./checkpoints/my-model GPULIST=0,1,2,3 bash scripts/v1_5/eval/sqa.sh
# Env: MODEL_PATH (or CKPT): checkpoint folder or hub id; NAME: answers subfolder (default: basename
#      of MODEL_PATH); MODEL_BASE: base LLM of a LoRA checkpoint; CONV_MODE (default: the checkpoint's
#      own template, config.conv_template); DATA_ROOT (default ./playground/data/eval); GPULIST:
#      comma-separated GPU ids, one chunk of the questions per GPU (default: $CUDA_VISIBLE_DEVICES,
#      else 0); PYTHON (default python). A failed chunk fails the script once the others have finished.
source "$(dirname "$0")/common.sh"
SQA=$DATA_ROOT/scienceqa
ANSWER_DIR=$SQA/answers/$NAME
run_chunked llava.eval.model_vqa_science "$ANSWER_DIR" \
    --question-file "$SQA/llava_test_CQM-A.json" \
    --image-folder "$SQA/images/test" \
    --single-pred-prompt
output_file=$ANSWER_DIR/merge.jsonl

"$PYTHON" -m llava.eval.eval_science_qa \
    --base-dir "$SQA" \
    --split test \
    --result-file "$output_file" \
    --output-file "$ANSWER_DIR/per_question.json" \
    --output-result "$ANSWER_DIR/result.json"
