#!/usr/bin/env bash
# Create (or update) .venv in the repository root with this project installed in editable mode.
# Idempotent: it reinstalls only when pyproject.toml (or the extras asked for) changed.
# Usage: bash scripts/bootstrap.sh [extra,extra]   e.g.  bash scripts/bootstrap.sh dev,demo,eval
# With `eval`, lmms-eval is installed with --no-deps and the venv ends without torchvision / timm.
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
hash="$(cat pyproject.toml scripts/bootstrap.sh scripts/constraints.txt | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(head -n 1 "$stamp")" = "$hash" ]; then
  # Up to date when every extra asked for is already installed (a superset is fine).
  have=",$(tail -n 1 "$stamp"),"; missing=""
  IFS=',' read -ra asked <<< "$extras"
  for e in "${asked[@]}"; do [[ "$have" == *",$e,"* ]] || missing=1; done
  if [ -z "$missing" ]; then echo "$vpy"; exit 0; fi
  # keep what is installed: install the union
  extras="$(echo "$extras,$(tail -n 1 "$stamp")" | tr ',' '\n' | sort -u | paste -sd, -)"
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
if [[ ",$extras," == *",eval,"* ]]; then
  # lmms-eval's own requirements pull torchvision (a CUDA build here, whose presence breaks transformers'
  # image processors), timm, wandb, opencv...: install it alone; the `eval` extra lists what it needs.
  "$vpy" -m pip install -q --no-deps lmms-eval >&2
  for pkg in torchvision timm; do  # left by an earlier plain `pip install lmms-eval`
    if "$vpy" -m pip show -q "$pkg" >/dev/null 2>&1; then
      echo "[bootstrap] removing $pkg (torchvision's build here breaks transformers' image processors; timm needs it)" >&2
      "$vpy" -m pip uninstall -y -q "$pkg" >&2
    fi
  done
fi
printf "%s\n%s\n" "$hash" "$extras" > "$stamp"
echo "$vpy"
