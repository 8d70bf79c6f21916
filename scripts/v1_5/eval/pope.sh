#!/bin/bash
# POPE (COCO val2014; adversarial, popular, random: 8,910 yes/no questions), LLaVA-1.5 protocol:
# greedy decoding, per-split accuracy / precision / recall / F1 / yes-ratio; the paper reports the mean
# F1 (`python -m llava.eval.eval_pope`).
#
# Data: COCO val2014 images (http://images.cocodataset.org/zips/val2014.zip); POPE's label files
# coco_pope_{adversarial,popular,random}.json from https://github.com/RUCAIBox/POPE (output/coco/);
# the question list llava_pope_test.jsonl from LLaVA's eval.zip (see LLaVA's docs/Evaluation.md).
# Layout under $DATA_ROOT/pope:
#   llava_pope_test.jsonl
#   val2014/COCO_val2014_*.jpg
#   coco/coco_pope_{adversarial,popular,random}.json
# Writes answers/$NAME/{merge.jsonl,result.json}.
#
# Usage: MODEL_PATH=./checkpoints/my-model GPULIST=0,1,2,3 bash scripts/v1_5/eval/pope.sh
# Env: MODEL_PATH (or CKPT): checkpoint folder or hub id; NAME: answers subfolder (default: basename
#      of MODEL_PATH); MODEL_BASE: base LLM of a LoRA checkpoint; CONV_MODE (default: the checkpoint's
#      own template, config.conv_template); DATA_ROOT (default ./playground/data/eval); GPULIST:
#      comma-separated GPU ids, one chunk of the questions per GPU (default: $CUDA_VISIBLE_DEVICES,
#      else 0); PYTHON (default python). A failed chunk fails the script once the others have finished.
source "$(dirname "$0")/common.sh"
POPE=$DATA_ROOT/pope
ANSWER_DIR=$POPE/answers/$NAME
run_chunked llava.eval.model_vqa_loader "$ANSWER_DIR" \
    --question-file "$POPE/llava_pope_test.jsonl" \
    --image-folder "$POPE/val2014"
output_file=$ANSWER_DIR/merge.jsonl

"$PYTHON" -m llava.eval.eval_pope \
    --annotation-dir "$POPE/coco" \
    --question-file "$POPE/llava_pope_test.jsonl" \
    --result-file "$output_file" \
    --output-result "$ANSWER_DIR/result.json"
