# Sourced by the scripts in this folder: environment, tiny-preset detection and the launcher.
# Not meant to be run on its own.
set -euo pipefail
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
