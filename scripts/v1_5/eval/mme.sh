#!/bin/bash
# MME (14 subtasks, 2,374 yes/no questions), LLaVA-1.5 protocol: greedy decoding, per subtask
# acc + acc+ (x100), perception = sum of the 10 perception subtasks (max 2000), cognition = sum of the
# 4 cognition ones (max 800); the paper's MME column is perception / 20 (`python -m llava.eval.eval_mme`).
#
# Data: MME_Benchmark_release_version, from the MME authors (request form linked at
# https://github.com/BradyFU/Awesome-Multimodal-Large-Language-Models/tree/Evaluation); the question
# list llava_mme.jsonl from LLaVA's eval.zip (see LLaVA's docs/Evaluation.md).
# Layout under $DATA_ROOT/MME:
#   llava_mme.jsonl                 (question_id = "<subtask>/[images/]<image>")
#   MME_Benchmark_release_version/<subtask>/<image> and <image stem>.txt, or
#   MME_Benchmark_release_version/<subtask>/images/<image> and questions_answers_YN/<image stem>.txt
# The ground truth is read from the release's .txt files; no eval_tool conversion step is needed.
# Writes answers/$NAME/{merge.jsonl,result.json}.
#
# Usage: MODEL_PATH=./checkpoints/my-model GPULIST=0,1,2,3 bash scripts/v1_5/eval/mme.sh
# Env: MODEL_PATH (or CKPT): checkpoint folder or hub id; NAME: answers subfolder (default: basename
#      of MODEL_PATH); MODEL_BASE: base LLM of a LoRA checkpoint; CONV_MODE (default: the checkpoint's
#      own template, config.conv_template); DATA_ROOT (default ./playground/data/eval); GPULIST:
#      comma-separated GPU ids, one chunk of the questions per GPU (default: $CUDA_VISIBLE_DEVICES,
#      else 0); PYTHON (default python). A failed chunk fails the script once the others have finished.
source "$(dirname "$0")/common.sh"
MME=$DATA_ROOT/MME
ANSWER_DIR=$MME/answers/$NAME
run_chunked llava.eval.model_vqa_loader "$ANSWER_DIR" \
    --question-file "$MME/llava_mme.jsonl" \
    --image-folder "$MME/MME_Benchmark_release_version"
output_file=$ANSWER_DIR/merge.jsonl

"$PYTHON" -m llava.eval.eval_mme \
    --answers-file "$output_file" \
    --mme-root "$MME/MME_Benchmark_release_version" \
    --output-result "$ANSWER_DIR/result.json"
