#!/usr/bin/env bash
# The test command: set up (idempotent), then run the whole suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
# set-up output minus one harmless pip line; a failed set-up stops here with its exit code
set +o pipefail
bash scripts/setup.sh 2>&1 | grep -v "is ignored: it is neither a file nor a directory"
setup_rc=${PIPESTATUS[0]}
set -o pipefail
[ "$setup_rc" -eq 0 ] || { echo "[setup] failed with exit code $setup_rc" >&2; exit "$setup_rc"; }
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
echo "[test] wall time including set-up: $(( $(date +%s) - start )) s"
exit $rc
