#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with pinned packages, torch first and explicitly.
# A second run reuses what is there (a stamp of the requirement files skips pip when nothing changed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_PIN="torch==2.13.0"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.notellm2-installed"
want=$(cat requirements.txt requirements-dev.txt setup.py | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[setup] $VENV is up to date"
else
  start=$(date +%s)
  # torch first, pinned: an unpinned torch pulled in by another package would be a multi-GB CUDA build.
  "$VENV/bin/pip" install -q --disable-pip-version-check "$TORCH_PIN"
  "$VENV/bin/pip" install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
  # Packages whose own metadata would drag in unpinned deps are installed without them.
  if [ -f requirements-nodeps.txt ]; then
    "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps -r requirements-nodeps.txt
  fi
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
  echo "$want" > "$stamp"
  echo "[setup] installed in $(( $(date +%s) - start )) s"
fi
