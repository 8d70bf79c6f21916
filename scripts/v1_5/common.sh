# Sourced by the scripts in this folder: environment, tiny-preset detection and the launcher.
# Not meant to be run on its own.
#
# Paths: the scripts run from the repository root, so relative paths given in the environment are first
# made absolute against the caller's working directory: DATA_PATH IMAGE_FOLDER OUTPUT_DIR PRETRAIN_DIR
# DS_CONFIG TINY_ROOT always, PYTHON when it contains a '/', and MODEL TEACHER VISION_TOWER when they name
# an existing file or folder there (otherwise they pass unchanged: a hub id such as Qwen/Qwen2-0.5B, or an
# open_clip:/hf-hub: spec). Defaults (./checkpoints/..., ./scripts/zero2.json, playground/tiny) are in the
# repository root.
set -euo pipefail
CALLER_DIR="$PWD"

# from_caller PATH: PATH made absolute against the caller's working directory (absolute paths unchanged).
from_caller() {
    case "$1" in
        /*) printf '%s' "$1" ;;
        *) printf '%s' "$CALLER_DIR/${1#./}" ;;
    esac
}

for var in DATA_PATH IMAGE_FOLDER OUTPUT_DIR PRETRAIN_DIR DS_CONFIG TINY_ROOT; do
    if [ -n "${!var:-}" ]; then printf -v "$var" '%s' "$(from_caller "${!var}")"; fi
done
for var in MODEL TEACHER VISION_TOWER; do
    if [ -n "${!var:-}" ] && [ -e "${!var}" ]; then printf -v "$var" '%s' "$(from_caller "${!var}")"; fi
done
case "${PYTHON:-}" in */*) PYTHON="$(from_caller "$PYTHON")" ;; esac

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

# launch MODULE ARGS...: `deepspeed` with $DS_CONFIG on GPUs, plain python on CPU.
launch() {
    local module="$1"; shift
    if [ "$NUM_GPUS" -gt 0 ]; then
        "$(dirname "$PYTHON")/deepspeed" --num_gpus "$NUM_GPUS" --module "$module" --deepspeed "$DS_CONFIG" "$@"
    else
        "$PYTHON" -m "$module" --use_cpu "$@"
    fi
}

# Tiny-preset paths (TINY_WORLD, TINY_TEACHER, TINY_SIGLIP, ...) for $TINY_BACKBONE.
tiny_paths() {
    eval "$("$PYTHON" -m llava.tiny.preset paths --root "$TINY_ROOT" --backbone "$TINY_BACKBONE")"
}
TINY_ROOT="${TINY_ROOT:-playground/tiny}"
TINY_BACKBONE="${TINY_BACKBONE:-qwen2}"
