#!/usr/bin/env bash
# Stage 1 (LLaVA pretrain): align the projector on captions; saves OUTPUT_DIR/mm_projector.safetensors.
#
# Environment overrides (none set = the built-in tiny preset on CPU):
#   MODEL          LLM checkpoint dir or hub id (Qwen2-0.5B/1.5B, Qwen3-0.6B/1.7B, ... or the 7-8B teacher's LLM)
#   VISION_TOWER   SigLIP checkpoint dir (e.g. siglip-base-patch16-384)
#   DATA_PATH      caption data, LLaVA JSON (paper: ShareGPT4V-PT 1.2M for students, LLaVA-558k for teachers)
#   IMAGE_FOLDER   image root of DATA_PATH
#   OUTPUT_DIR     default ./checkpoints/llava-qwen-pretrain (in the repository)
#   NUM_GPUS       GPUs per node, default: all visible GPUs (0 = CPU, plain python)
#   DS_CONFIG      default ./scripts/zero2.json
#   BATCH GRAD_ACC LR EPOCHS MAX_LEN   per-device batch (32), accumulation (1), lr (1e-3), epochs (1), 2048
#   (paper, Table 12: global batch 256, lr 1e-3, cosine, warmup 0.03, bf16, ZeRO-2; e.g. 8 GPUs x 32)
#   GRAD_CKPT      gradient checkpointing, 1 (default with MODEL set) or 0
#   REPORT_TO      none (default), wandb, tensorboard, ...
#   EXTRA_ARGS     extra flags for llava.train.train, last on its command line, split as a shell would
#                  (e.g. '--save_steps 1000 --resume_from_checkpoint False'; see common.sh)
#   NUM_NODES HOSTFILE MASTER_ADDR MASTER_PORT   multi-node, passed to the DeepSpeed launcher (common.sh)
# MODEL unset with VISION_TOWER, DATA_PATH or IMAGE_FOLDER set is an error (a forgotten MODEL=).
# Relative paths in MODEL VISION_TOWER DATA_PATH IMAGE_FOLDER OUTPUT_DIR DS_CONFIG HOSTFILE TINY_ROOT are taken
# from your working directory (the script then runs from the repository root; MODEL VISION_TOWER only when they
# exist there, so hub ids pass unchanged).
source "$(dirname "$0")/common.sh"
extra_args

if [ -z "${MODEL:-}" ]; then
    # Tiny preset: world + tokenizer + teacher (its first stage trains the shared SigLIP), then the student.
    "$PYTHON" -m llava.tiny.preset teacher --root "$TINY_ROOT" --backbone "$TINY_BACKBONE"
    tiny_paths
    MODEL="$TINY_STUDENT_BASE"; VISION_TOWER="$TINY_SIGLIP"
    DATA_PATH="$TINY_WORLD/pretrain.json"; IMAGE_FOLDER="$TINY_IMAGES"
    OUTPUT_DIR="${OUTPUT_DIR:-$TINY_ROOT/student/$TINY_BACKBONE-pretrain}"
    BATCH="${BATCH:-16}"; LR="${LR:-2e-3}"; MAX_LEN="${MAX_LEN:-256}"
    # Random-init tiny LLMs: the student's LLM trains with its projector here (a real run freezes it).
    STAGE_ARGS=(--tune_mm_mlp_adapter False --logging_steps 20 --save_steps 200 --dataloader_num_workers 1)
    grad_ckpt 0
else
    STAGE_ARGS=(--tune_mm_mlp_adapter True --bf16 True --logging_steps 1 --save_steps 24000
                --dataloader_num_workers 4)
    grad_ckpt 1
fi
OUTPUT_DIR="${OUTPUT_DIR:-./checkpoints/llava-qwen-pretrain}"
if stage_done "$OUTPUT_DIR" mm_projector.safetensors model.safetensors; then
    echo "[pretrain] $OUTPUT_DIR is complete; delete it to train again"; exit 0
fi

launch llava.train.train \
    --model_name_or_path "$MODEL" --version plain \
    --data_path "$DATA_PATH" --image_folder "$IMAGE_FOLDER" --vision_tower "$VISION_TOWER" \
    --mm_projector_type mlp2x_gelu --mm_vision_select_layer -2 \
    --output_dir "$OUTPUT_DIR" --num_train_epochs "${EPOCHS:-1}" \
    --per_device_train_batch_size "${BATCH:-32}" --gradient_accumulation_steps "${GRAD_ACC:-1}" \
    --learning_rate "${LR:-1e-3}" --weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type cosine \
    --model_max_length "${MAX_LEN:-2048}" --save_strategy steps --save_total_limit 1 \
    --report_to "${REPORT_TO:-none}" "${STAGE_ARGS[@]}" "${EXTRA[@]}"
