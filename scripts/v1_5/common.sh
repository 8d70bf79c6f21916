# Sourced by the scripts in this folder: environment, tiny-preset detection and the launcher.
# Not meant to be run on its own.
#
# Variables every training script reads (besides its own, listed in its header):
#   MODEL          unset = the built-in tiny preset. Unset while TEACHER PRETRAIN_DIR VISION_TOWER DATA_PATH or
#                  IMAGE_FOLDER is set is an error naming them (a forgotten MODEL= would train the tiny models)
#   EXTRA_ARGS     extra flags for the stage's python entry, last on its command line (so they win), split as a
#                  shell would with nothing expanded: EXTRA_ARGS='--save_steps 500 --resume_from_checkpoint False'
#                  (--resume_from_checkpoint: unset = the newest complete checkpoint-N of OUTPUT_DIR, a path =
#                  that checkpoint, False = a fresh run). The tiny preset's earlier stages run without it.
#   REPORT_TO      where the trainer logs: none (default), wandb, tensorboard, ... (HF's --report_to)
#   GRAD_CKPT      1 = --gradient_checkpointing True, 0 = off (default: 1 at real scale, 0 for the tiny preset)
#   NUM_GPUS       GPUs per node (default: all visible; 0 = CPU, plain python)
#   NUM_NODES HOSTFILE MASTER_ADDR MASTER_PORT   multi-node: passed to the DeepSpeed launcher as --num_nodes
#                  --hostfile --master_addr --master_port (each only when set; GPUs only)
#   DS_CONFIG      default ./scripts/zero2.json
#
# Paths: the scripts run from the repository root, so relative paths given in the environment are first
# made absolute against the caller's working directory: DATA_PATH IMAGE_FOLDER OUTPUT_DIR PRETRAIN_DIR
# DS_CONFIG HOSTFILE TINY_ROOT always, PYTHON when it contains a '/', and MODEL TEACHER VISION_TOWER when they
# name an existing file or folder there (otherwise they pass unchanged: a hub id such as Qwen/Qwen2-0.5B, or an
# open_clip:/hf-hub: spec). Defaults (./checkpoints/..., ./scripts/zero2.json, playground/tiny) are in the
# repository root. Relative paths inside EXTRA_ARGS / DISTILL_ARGS are read from the repository root.
set -euo pipefail
CALLER_DIR="$PWD"

# from_caller PATH: PATH made absolute against the caller's working directory (absolute paths unchanged).
from_caller() {
    case "$1" in
        /*) printf '%s' "$1" ;;
        *) printf '%s' "$CALLER_DIR/${1#./}" ;;
    esac
}

for var in DATA_PATH IMAGE_FOLDER OUTPUT_DIR PRETRAIN_DIR DS_CONFIG HOSTFILE TINY_ROOT; do
    if [ -n "${!var:-}" ]; then printf -v "$var" '%s' "$(from_caller "${!var}")"; fi
done
for var in MODEL TEACHER VISION_TOWER; do
    if [ -n "${!var:-}" ] && [ -e "${!var}" ]; then printf -v "$var" '%s' "$(from_caller "${!var}")"; fi
done
case "${PYTHON:-}" in */*) PYTHON="$(from_caller "$PYTHON")" ;; esac

# fail: the message on stderr, exit 2 (before anything is built or trained).
fail() { echo "error: $*" >&2; exit 2; }

# MODEL unset selects the tiny preset; real-scale variables set without it mean a forgotten MODEL=.
if [ -z "${MODEL:-}" ]; then
    given=()
    for var in TEACHER PRETRAIN_DIR VISION_TOWER DATA_PATH IMAGE_FOLDER; do
        if [ -n "${!var:-}" ]; then given+=("$var"); fi
    done
    if [ "${#given[@]}" -gt 0 ]; then
        fail "${given[*]} set but MODEL is not: set MODEL (the student's LLM, a dir or hub id) for a real-scale" \
             "run, or unset ${given[*]} for the built-in tiny preset"
    fi
fi
case "${GRAD_CKPT:-0}" in 0|1) ;; *) fail "GRAD_CKPT must be 0 or 1, got '$GRAD_CKPT'" ;; esac
if [ -n "${NUM_NODES:-}" ] && ! [[ "$NUM_NODES" =~ ^[1-9][0-9]*$ ]]; then
    fail "NUM_NODES must be a positive integer, got '$NUM_NODES'"
fi
if [ -n "${HOSTFILE:-}" ] && [ ! -f "$HOSTFILE" ]; then fail "HOSTFILE $HOSTFILE does not exist"; fi

# split_args STRING: the words of STRING as a shell splits them (single and double quotes, backslashes),
# into the array SPLIT_ARGS; nothing is expanded or executed. An unmatched quote is an error.
split_args() {
    local s="$1" word="" quote="" have=0 c i=0
    SPLIT_ARGS=()
    while [ "$i" -lt "${#s}" ]; do
        c="${s:i:1}"
        if [ "$quote" = "'" ]; then
            if [ "$c" = "'" ]; then quote=""; else word+="$c"; fi
        elif [ "$quote" = '"' ]; then
            if [ "$c" = '"' ]; then
                quote=""
            elif [ "$c" = '\' ] && [[ "${s:i+1:1}" == [\"\\\$\`] ]]; then  # the escapes bash keeps in "..."
                word+="${s:i+1:1}"; i=$((i + 1))
            else
                word+="$c"
            fi
        elif [[ "$c" == [[:space:]] ]]; then
            if [ "$have" = 1 ]; then SPLIT_ARGS+=("$word"); word=""; have=0; fi
        elif [ "$c" = "'" ] || [ "$c" = '"' ]; then
            quote="$c"; have=1
        elif [ "$c" = '\' ]; then
            word+="${s:i+1:1}"; i=$((i + 1)); have=1
        else
            word+="$c"; have=1
        fi
        i=$((i + 1))
    done
    if [ -n "$quote" ]; then echo "unmatched $quote in: $s" >&2; return 1; fi
    if [ "$have" = 1 ]; then SPLIT_ARGS+=("$word"); fi
}

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
# The project's own virtual environment (created on first use; a no-op when up to date).
PYTHON="${PYTHON:-$(bash scripts/bootstrap.sh dev | tail -n 1)}"
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

# GPUs visible to torch (0 on a CPU machine).
NUM_GPUS="${NUM_GPUS:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)}"

DS_CONFIG="${DS_CONFIG:-./scripts/zero2.json}"

# launch MODULE ARGS...: `deepspeed` with $DS_CONFIG on GPUs (multi-node with NUM_NODES / HOSTFILE), plain
# python on CPU.
launch() {
    local module="$1"; shift
    local nodes=(--num_gpus "$NUM_GPUS")
    if [ -n "${NUM_NODES:-}" ]; then nodes+=(--num_nodes "$NUM_NODES"); fi
    if [ -n "${HOSTFILE:-}" ]; then nodes+=(--hostfile "$HOSTFILE"); fi
    if [ -n "${MASTER_ADDR:-}" ]; then nodes+=(--master_addr "$MASTER_ADDR"); fi
    if [ -n "${MASTER_PORT:-}" ]; then nodes+=(--master_port "$MASTER_PORT"); fi
    if [ "$NUM_GPUS" -gt 0 ]; then
        "$(dirname "$PYTHON")/deepspeed" "${nodes[@]}" --module "$module" --deepspeed "$DS_CONFIG" "$@"
    elif [ "${NUM_NODES:-1}" -gt 1 ] || [ -n "${HOSTFILE:-}" ]; then
        fail "NUM_NODES / HOSTFILE need the DeepSpeed launcher, i.e. GPUs (NUM_GPUS is 0 here)"
    else
        "$PYTHON" -m "$module" --use_cpu "$@"
    fi
}

# extra_args [STRING]: the array EXTRA = the words of STRING, then those of EXTRA_ARGS (both split by split_args).
extra_args() {
    split_args "${1:-}"
    EXTRA=("${SPLIT_ARGS[@]}")
    split_args "${EXTRA_ARGS:-}"
    EXTRA+=("${SPLIT_ARGS[@]}")
}

# grad_ckpt DEFAULT: `--gradient_checkpointing True` added to STAGE_ARGS when GRAD_CKPT (default DEFAULT) is 1.
grad_ckpt() {
    if [ "${GRAD_CKPT:-$1}" = 1 ]; then STAGE_ARGS+=(--gradient_checkpointing True); fi
}

# stage_done OUT FILE...: true when OUT holds one of FILE, a finished stage that the script reuses. A finished
# stage trained for another number of epochs (its trainer_state.json) than EPOCHS asks is an error: reusing it
# would, e.g., put a 1-epoch SFT student beside 8-epoch distilled ones in the tiny preset's table. Not checked
# when EXTRA sets --max_steps or --num_train_epochs (then EPOCHS is not what decided the length).
stage_done() {
    local out="$1" file found="" have want arg
    shift
    for file in "$@"; do if [ -f "$out/$file" ]; then found=1; fi; done
    [ -n "$found" ] || return 1
    for arg in ${EXTRA[@]+"${EXTRA[@]}"}; do
        case "$arg" in --max_steps|--max_steps=*|--num_train_epochs|--num_train_epochs=*) return 0 ;; esac
    done
    want="${EPOCHS:-1}"
    have="$(sed -n 's/^ *"num_train_epochs": *\([0-9.]*\).*/\1/p' "$out/trainer_state.json" 2>/dev/null | head -n 1)"
    # the trainer records whole epochs (ceil of a fractional EPOCHS)
    if [ -n "$have" ] && awk -v h="$have" -v w="$want" 'BEGIN { c = int(w); if (w > c) c++; exit !(h != c) }'; then
        fail "$out holds a finished stage trained for $have epoch(s), but EPOCHS=$want: delete it to train" \
             "again, or set EPOCHS=$have to reuse it"
    fi
}

# Tiny-preset paths (TINY_WORLD, TINY_TEACHER, TINY_SIGLIP, ...) for $TINY_BACKBONE.
tiny_paths() {
    eval "$("$PYTHON" -m llava.tiny.preset paths --root "$TINY_ROOT" --backbone "$TINY_BACKBONE")"
}
TINY_ROOT="${TINY_ROOT:-playground/tiny}"
TINY_BACKBONE="${TINY_BACKBONE:-qwen2}"
