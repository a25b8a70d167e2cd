#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with pinned packages, torch first and explicitly.
# A second run reuses what is there (a stamp of the requirement files skips pip when nothing changed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_PIN="torch==2.13.0"
# Debian packages: a local Slurm for the Slurm tests, numactl for the deepspeed launcher's core
# binding, the openclipart catalog used by the demo and a data test, and (below) Java for pyspark.
APT_PACKAGES=(slurmctld slurmd slurm-client munge numactl openclipart-svg openclipart-png)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
# pyspark (`mine-pairs --engine spark` and its tests) needs a Java 17+ runtime; any java on PATH will do.
command -v java >/dev/null 2>&1 || missing+=(openjdk-17-jre-headless)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] apt-get install ${missing[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "[setup] warning: missing Debian packages (${missing[*]}) and no root apt-get; tests that need them skip"
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.notellm2-installed"
want=$(cat requirements.txt requirements-dev.txt requirements-nodeps.txt setup.py | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[setup] $VENV is up to date"
else
  start=$(date +%s)
  # pip, minus one harmless warning line; with pipefail a failing pip still fails the set-up
  pipq() { "$VENV/bin/pip" "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }
  pipq install -q --disable-pip-version-check "$TORCH_PIN"
  pipq install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
  # Packages whose own metadata would drag in unpinned deps are installed without them.
  if [ -f requirements-nodeps.txt ]; then
    pipq install -q --disable-pip-version-check --no-deps -r requirements-nodeps.txt
  fi
  pipq install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
  echo "$want" > "$stamp"
  echo "[setup] installed in $(( $(date +%s) - start )) s"
fi
