#!/usr/bin/env bash
# The test command: bootstrap .venv (idempotent), lint, then the whole pytest suite (slow tests included).
# Extra arguments go to pytest, e.g.  bash scripts/run_tests.sh -m "not slow"  or  -k tpa
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$(bash scripts/bootstrap.sh dev,demo,eval | tail -n 1)"  # demo, eval: browser and lmms-eval tests
"$PY" -m ruff check .
export TOKENIZERS_PARALLELISM=false
exec "$PY" -m pytest -q "$@"
