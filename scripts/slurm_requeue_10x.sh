#!/usr/bin/env bash
# The Slurm requeue test (warning -> checkpoint -> requeue -> exact resume on a real local Slurm)
# N times in a row (default 10) from a fresh clone of this checkout; stops at the first failure.
#   bash scripts/slurm_requeue_10x.sh [N] [CLONE_DIR]
set -u
N=${1:-10}
CLONE=${2:-/tmp/notellm2-slurm-soak}
rm -rf "$CLONE" && git clone -q "$(cd "$(dirname "$0")/.." && pwd)" "$CLONE" && cd "$CLONE" || exit 1
bash scripts/setup.sh > "$CLONE/setup.log" 2>&1 || { echo "setup failed (see $CLONE/setup.log)"; exit 1; }
export OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
for i in $(seq 1 "$N"); do
  start=$(date +%s)
  .venv/bin/python -m pytest -q "tests/slurm/test_slurm_train.py::test_time_limit_warning_checkpoints_requeues_and_resumes" > "$CLONE/run$i.log" 2>&1
  rc=$?
  echo "run $i: rc=$rc $(tail -1 "$CLONE/run$i.log") ($(( $(date +%s) - start )) s)"
  [ $rc -eq 0 ] || exit 1
done
echo "$N of $N green"
