#!/usr/bin/env bash
# Stage 2 (LLaVA finetune, plain SFT): LLM + projector on the instruction mix; saves a full checkpoint.
#
# Environment overrides (none set = the built-in tiny preset on CPU; runs pretrain.sh first if needed):
#   MODEL          LLM checkpoint dir or hub id (the same as in pretrain.sh)
#   PRETRAIN_DIR   output of pretrain.sh (holds mm_projector.safetensors)
#   VISION_TOWER   SigLIP checkpoint dir
#   DATA_PATH      instruction data, LLaVA JSON (paper: the 2.4M mix of Table 13; LLaVA-mix-665k for teachers)
#   IMAGE_FOLDER   image root of DATA_PATH
#   VERSION        conversation template: qwen_2 (Qwen2) or qwen_3 (Qwen3)
#   OUTPUT_DIR     default ./checkpoints/llava-qwen-sft (in the repository)
#   NUM_GPUS DS_CONFIG BATCH GRAD_ACC LR EPOCHS MAX_LEN   as in pretrain.sh (lr 2e-5, global batch 128)
#   GRAD_CKPT      gradient checkpointing, 1 (default with MODEL set) or 0
#   REPORT_TO      none (default), wandb, tensorboard, ...
#   EXTRA_ARGS     extra flags for llava.train.train, last on its command line, split as a shell would
#                  (e.g. '--resume_from_checkpoint False'; see common.sh); the tiny preset's pretrain stage
#                  runs without them
#   NUM_NODES HOSTFILE MASTER_ADDR MASTER_PORT   multi-node, passed to the DeepSpeed launcher (common.sh)
# MODEL unset with PRETRAIN_DIR, VISION_TOWER, DATA_PATH or IMAGE_FOLDER set is an error (a forgotten MODEL=).
# Relative paths in MODEL PRETRAIN_DIR VISION_TOWER DATA_PATH IMAGE_FOLDER OUTPUT_DIR DS_CONFIG HOSTFILE
# TINY_ROOT are taken from your working directory (the script then runs from the repository root; MODEL
# VISION_TOWER only when they exist there, so hub ids pass unchanged).
source "$(dirname "$0")/common.sh"
extra_args

if [ -z "${MODEL:-}" ]; then
    tiny_paths
    PRETRAIN_DIR="$TINY_ROOT/student/$TINY_BACKBONE-pretrain"
    # the preset's pretrain stage is fixed like its teacher (1 epoch): EPOCHS is the students' budget
    EPOCHS=1 EXTRA_ARGS="" OUTPUT_DIR="$PRETRAIN_DIR" bash "$(dirname "$0")/pretrain.sh"
    # The tiny student's pretrain stage saved a full checkpoint (LLM trained too): start from it.
    MODEL="$PRETRAIN_DIR"; VISION_TOWER="$TINY_SIGLIP"
    DATA_PATH="$TINY_WORLD/finetune.json"; IMAGE_FOLDER="$TINY_IMAGES"
    VERSION="${VERSION:-$([ "$TINY_BACKBONE" = qwen3 ] && echo qwen_3 || echo qwen_2)}"
    OUTPUT_DIR="${OUTPUT_DIR:-$TINY_ROOT/student/$TINY_BACKBONE-sft}"
    BATCH="${BATCH:-16}"; LR="${LR:-1e-3}"; MAX_LEN="${MAX_LEN:-256}"
    STAGE_ARGS=(--logging_steps 20 --save_steps 200 --dataloader_num_workers 1)
    grad_ckpt 0
else
    : "${PRETRAIN_DIR:?set PRETRAIN_DIR to the output dir of pretrain.sh}"
    STAGE_ARGS=(--pretrain_mm_mlp_adapter "$PRETRAIN_DIR/mm_projector.safetensors" --bf16 True --logging_steps 1
                --save_steps 2000 --dataloader_num_workers 4 --group_by_modality_length True)
    grad_ckpt 1
fi
OUTPUT_DIR="${OUTPUT_DIR:-./checkpoints/llava-qwen-sft}"
if stage_done "$OUTPUT_DIR" model.safetensors model.safetensors.index.json; then
    echo "[finetune] $OUTPUT_DIR is complete; delete it to train again"; exit 0
fi

launch llava.train.train \
    --model_name_or_path "$MODEL" --version "${VERSION:-qwen_2}" \
    --data_path "$DATA_PATH" --image_folder "$IMAGE_FOLDER" --vision_tower "$VISION_TOWER" \
    --mm_projector_type mlp2x_gelu --mm_vision_select_layer -2 --image_aspect_ratio pad \
    --output_dir "$OUTPUT_DIR" --num_train_epochs "${EPOCHS:-1}" \
    --per_device_train_batch_size "${BATCH:-16}" --gradient_accumulation_steps "${GRAD_ACC:-1}" \
    --learning_rate "${LR:-2e-5}" --weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type cosine \
    --model_max_length "${MAX_LEN:-2048}" --save_strategy steps --save_total_limit 1 \
    --report_to "${REPORT_TO:-none}" "${STAGE_ARGS[@]}" "${EXTRA[@]}"
