#!/bin/bash
# MMBench dev (English; 4,377 rows = the questions plus their circularly shifted copies), LLaVA-1.5
# protocol: "Answer with the option's letter from the given choices directly.", greedy decoding,
# CircularEval accuracy: a question counts only if all its rotations are right; rows i + k * 1e6 are
# the rotations of question i (`python -m llava.eval.eval_mmbench`). The test split has no answers:
# submit it to the MMBench server instead.
#
# Data: mmbench_dev_20230712.tsv (images embedded as base64) from
# https://download.openmmlab.com/mmclassification/datasets/mmbench/mmbench_dev_20230712.tsv
# (see LLaVA's docs/Evaluation.md).
# Layout under $DATA_ROOT/mmbench:
#   $SPLIT.tsv            (SPLIT defaults to mmbench_dev_20230712)
# ALL_ROUNDS=1 also asks every rotation of every row (LLaVA's --all-rounds), for a TSV that does not
# carry its rotations itself. MMBENCH_LANG (default en) is passed to --lang.
# Writes answers/$SPLIT/$NAME/{merge.jsonl,result.json}.
#
# Usage: MODEL_PATH=./checkpoints/my-model GPULIST=0,1,2,3 bash scripts/v1_5/eval/mmbench.sh
# Env: MODEL_PATH (or CKPT): checkpoint folder or hub id; NAME: answers subfolder (default: basename
#      of MODEL_PATH); MODEL_BASE: base LLM of a LoRA checkpoint; CONV_MODE (default: the checkpoint's
#      own template, config.conv_template); DATA_ROOT (default ./playground/data/eval); GPULIST:
#      comma-separated GPU ids, one chunk of the questions per GPU (default: $CUDA_VISIBLE_DEVICES,
#      else 0); PYTHON (default python). A failed chunk fails the script once the others have finished.
source "$(dirname "$0")/common.sh"
SPLIT=${SPLIT:-mmbench_dev_20230712}
ALL_ROUNDS=${ALL_ROUNDS:-0}
MMBENCH_LANG=${MMBENCH_LANG:-en}
MMBENCH=$DATA_ROOT/mmbench
ANSWER_DIR=$MMBENCH/answers/$SPLIT/$NAME
ROUNDS_FLAG=""
if [ "$ALL_ROUNDS" = 1 ]; then ROUNDS_FLAG=--all-rounds; fi
run_chunked llava.eval.model_vqa_mmbench "$ANSWER_DIR" \
    --question-file "$MMBENCH/$SPLIT.tsv" \
    --single-pred-prompt \
    --lang "$MMBENCH_LANG" \
    $ROUNDS_FLAG
output_file=$ANSWER_DIR/merge.jsonl

"$PYTHON" -m llava.eval.eval_mmbench \
    --annotation-file "$MMBENCH/$SPLIT.tsv" \
    --result-file "$output_file" \
    --output-result "$ANSWER_DIR/result.json"
