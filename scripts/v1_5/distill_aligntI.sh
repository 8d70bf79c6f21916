#!/usr/bin/env bash
# Align-TI distillation (the main job): the student's finetune stage with L = L_sft + L_kd + L_iva + L_tpa.
#
# Environment overrides (none set = the built-in tiny preset end to end on CPU: world, tokenizer, teacher,
# student pretrain, SFT baseline, Align-TI student, the vanilla-KD baseline, then a per-family table of all four):
#   TEACHER        LLaVA-Qwen teacher checkpoint dir (e.g. Qwen2-7B + SigLIP after both LLaVA stages)
#   MODEL          student LLM dir or hub id (Qwen2-0.5B/1.5B, Qwen3-0.6B/1.7B)
#   PRETRAIN_DIR   student's pretrain.sh output (mm_projector.safetensors)
#   VISION_TOWER   SigLIP dir (the teacher's: N_v must match)
#   DATA_PATH IMAGE_FOLDER   finetune data (paper: the 2.4M mix of Table 13)
#   VERSION        qwen_2 | qwen_3;   OUTPUT_DIR  default ./checkpoints/llava-qwen-aligntI (in the repository)
#   NUM_GPUS DS_CONFIG BATCH GRAD_ACC LR EPOCHS MAX_LEN   as in finetune.sh (paper: lr 2e-5, global batch 128);
#                  DS_CONFIG=./scripts/zero3.json also partitions the teacher (docs/training.md, "ZeRO-3")
#   EPOCHS         the tiny preset: the students' epochs (SFT, Align-TI, vanilla KD; its pretrain stays 1). A
#                  finished student (of any stage, any scale) trained for other epochs is an error, not reused
#   GRAD_CKPT      1 = gradient checkpointing of the student (default 1 with MODEL set, 0 for the tiny preset):
#                  less activation memory, one more no-grad student pass per step (TPA's exact fallback: same
#                  loss and gradients); 0 is faster where the batch fits (docs/scaling.md)
#   REPORT_TO      none (default), wandb, tensorboard, ...
#   DISTILL_ARGS   extra flags, e.g. "--recipe kd" (vanilla KD), "--recipe sft_iva" (Table 4's IVA only),
#                  "--tpa_sampling greedy" (defaults: --recipe aligntI = --w_sft 1 --w_kd 1 --w_iva 1 --w_tpa 1
#                   --divergence fkl --iva_layer auto --iva_weight_source teacher --tpa_num_samples 4
#                   --tpa_sampling nucleus --tpa_top_p 0.9; recipes: README),
#                  split as a shell would: DISTILL_ARGS='--irs_path "/my data/irs.json"' is two arguments
#                  (nothing in it is expanded; relative paths in it are read from the repository root)
#   EXTRA_ARGS     more flags, split the same way, after DISTILL_ARGS (e.g. '--resume_from_checkpoint False',
#                  '--save_steps 500'; see common.sh); the tiny preset's SFT and pretrain stages run without
#                  DISTILL_ARGS and EXTRA_ARGS
#   NUM_NODES HOSTFILE MASTER_ADDR MASTER_PORT   multi-node, passed to the DeepSpeed launcher (common.sh)
# MODEL unset with TEACHER, PRETRAIN_DIR, VISION_TOWER, DATA_PATH or IMAGE_FOLDER set is an error (a forgotten
# MODEL=). Relative paths in TEACHER MODEL PRETRAIN_DIR VISION_TOWER DATA_PATH IMAGE_FOLDER OUTPUT_DIR DS_CONFIG
# HOSTFILE TINY_ROOT are taken from your working directory (the script then runs from the repository root;
# MODEL TEACHER VISION_TOWER only when they exist there, so hub ids pass unchanged).
source "$(dirname "$0")/common.sh"
extra_args "${DISTILL_ARGS:-}"  # EXTRA: DISTILL_ARGS, then EXTRA_ARGS

if [ -z "${MODEL:-}" ]; then
    tiny_paths
    PRETRAIN_DIR="$TINY_ROOT/student/$TINY_BACKBONE-pretrain"
    SFT_DIR="$TINY_ROOT/student/$TINY_BACKBONE-sft"
    # teacher, student pretrain and the SFT baseline
    EXTRA_ARGS="" OUTPUT_DIR="$SFT_DIR" bash "$(dirname "$0")/finetune.sh"
    TEACHER="$TINY_TEACHER"; MODEL="$PRETRAIN_DIR"; VISION_TOWER="$TINY_SIGLIP"
    DATA_PATH="$TINY_WORLD/finetune.json"; IMAGE_FOLDER="$TINY_IMAGES"
    VERSION="${VERSION:-$([ "$TINY_BACKBONE" = qwen3 ] && echo qwen_3 || echo qwen_2)}"
    OUTPUT_DIR="${OUTPUT_DIR:-$TINY_ROOT/student/$TINY_BACKBONE-aligntI}"
    BATCH="${BATCH:-16}"; LR="${LR:-1e-3}"; MAX_LEN="${MAX_LEN:-256}"
    STAGE_ARGS=(--logging_steps 20 --save_steps 200 --dataloader_num_workers 1)
    CKPT_DEFAULT=0
else
    : "${TEACHER:?set TEACHER to the teacher checkpoint dir}"
    : "${PRETRAIN_DIR:?set PRETRAIN_DIR to the output dir of pretrain.sh}"
    STAGE_ARGS=(--pretrain_mm_mlp_adapter "$PRETRAIN_DIR/mm_projector.safetensors" --bf16 True --logging_steps 1
                --save_steps 2000 --dataloader_num_workers 4 --group_by_modality_length True)
    CKPT_DEFAULT=1  # docs/scaling.md: without it BATCH=16 of 2048-token samples does not fit even on 80 GB
fi
grad_ckpt "$CKPT_DEFAULT"
OUTPUT_DIR="${OUTPUT_DIR:-./checkpoints/llava-qwen-aligntI}"

# distill OUT FLAGS...: train one student into OUT (unless OUT already holds a complete one), FLAGS last.
distill() {
    local out="$1"; shift
    if stage_done "$out" model.safetensors model.safetensors.index.json; then
        echo "[distill] $out is complete; delete it to train again"
        return
    fi
    launch aligntI_patch.distill \
        --model_name_or_path "$MODEL" --teacher_model_path "$TEACHER" --version "${VERSION:-qwen_2}" \
        --data_path "$DATA_PATH" --image_folder "$IMAGE_FOLDER" --vision_tower "$VISION_TOWER" \
        --mm_projector_type mlp2x_gelu --mm_vision_select_layer -2 --image_aspect_ratio pad \
        --output_dir "$out" --num_train_epochs "${EPOCHS:-1}" \
        --per_device_train_batch_size "${BATCH:-16}" --gradient_accumulation_steps "${GRAD_ACC:-1}" \
        --learning_rate "${LR:-2e-5}" --weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type cosine \
        --model_max_length "${MAX_LEN:-2048}" --save_strategy steps --save_total_limit 1 \
        --report_to "${REPORT_TO:-none}" "${STAGE_ARGS[@]}" "$@"
}
distill "$OUTPUT_DIR" "${EXTRA[@]}"

if [ -n "${SFT_DIR:-}" ]; then
    # the paper's central comparison: the vanilla-KD student (Eq. 2, --recipe kd), same budget and flags
    KD_DIR="$TINY_ROOT/student/$TINY_BACKBONE-kd"
    distill "$KD_DIR" --recipe kd
    "$PYTHON" -m aligntI_patch.report --world "$TINY_WORLD" --output-dir "$OUTPUT_DIR" \
        --model "teacher=$TEACHER" --model "sft-student=$SFT_DIR" --model "kd-student=$KD_DIR" \
        --model "align-ti-student=$OUTPUT_DIR"
fi
