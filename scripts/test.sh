#!/usr/bin/env bash
# The test command: set up (idempotent), then run the whole suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/setup.sh   # idempotent; set -e stops here if it fails
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
echo "[test] wall time including set-up: $(( $(date +%s) - start )) s"
exit $rc
