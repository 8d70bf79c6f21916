#!/usr/bin/env bash
# Create (or update) .venv in the repository root with this project installed in editable mode.
# Idempotent: it reinstalls only when pyproject.toml (or the extras asked for) changed.
# Usage: bash scripts/bootstrap.sh [extra,extra]   e.g.  bash scripts/bootstrap.sh dev,demo
# Prints the venv's python path on its last line.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
extras="${1:-dev}"
venv="$root/.venv"
py="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "[bootstrap] creating $venv" >&2
  "$py" -m venv "$venv"
fi
vpy="$venv/bin/python"
stamp="$venv/.align-ti-installed"
want="$(cat pyproject.toml scripts/bootstrap.sh scripts/constraints.txt | sha256sum | cut -c1-16)-$extras"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "$vpy"; exit 0
fi

# Pin the torch that is already available (a local CPU wheel or a preinstalled CUDA build):
# any package with an unpinned torch requirement would otherwise pull a multi-GB CUDA build.
cons="$venv/constraints.txt"
torch_ver="${ALIGNTI_TORCH_VERSION:-}"
if [ -z "$torch_ver" ]; then
  torch_ver="$("$vpy" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)"
fi
if [ -z "$torch_ver" ]; then
  torch_ver="$("$py" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || echo 2.13.0)"
fi
{ echo "torch==$torch_ver"; cat scripts/constraints.txt; } > "$cons"
echo "[bootstrap] pinning torch==$torch_ver; installing .[$extras]" >&2
export PIP_CONSTRAINT="$cons" PIP_DISABLE_PIP_VERSION_CHECK=1
"$vpy" -m pip install -q "torch==$torch_ver" >&2
"$vpy" -m pip install -q -e ".[$extras]" >&2
echo "$want" > "$stamp"
echo "$vpy"
