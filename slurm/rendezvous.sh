#!/bin/bash
# Print the torchrun rendezvous endpoint HOST:PORT of a Slurm job, one line.
#
#   slurm/rendezvous.sh [NODELIST [JOB_ID]]
#
# HOST is the first host of the job's node list (the node that runs the batch script and hosts
# the c10d store); NODELIST defaults to $SLURM_JOB_NODELIST. PORT is $RDZV_PORT when set, else
# 20000 + JOB_ID % 20000 (JOB_ID defaults to $SLURM_JOB_ID, else 0), so that two jobs sharing a
# head node do not collide. The node list is expanded by notellm2/hostlist.py (run with $PYTHON,
# else python3), the parser notellm2.launcher.distributed uses under plain srun: lists like
# "node[07-09,12],gpu3", "rack[3-4]-gpu[01-02],x" or "localhost" give the same head node in both.
# Used by slurm/train.sbatch and by the tests (tests/slurm/), so both derive it the same way.
set -euo pipefail

nodelist="${1:-${SLURM_JOB_NODELIST:-}}"
job_id="${2:-${SLURM_JOB_ID:-0}}"
if [ -z "$nodelist" ]; then
    echo "rendezvous.sh: no node list (pass one or run inside a Slurm job with SLURM_JOB_NODELIST set)" >&2
    exit 2
fi

# One host-list parser for the stack (notellm2/hostlist.py, standard library only; the launcher uses
# it too): "rack[3-4]-gpu[01-02],x" -> "rack3-gpu01", as `scontrol show hostnames` expands it.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
head_host="$("${PYTHON:-python3}" -I "$here/../notellm2/hostlist.py" first "$nodelist")" || exit 2
if ! [[ "$job_id" =~ ^[0-9]+$ ]]; then
    echo "rendezvous.sh: job id '$job_id' is not a number" >&2
    exit 2
fi
port="${RDZV_PORT:-$((20000 + job_id % 20000))}"
echo "${head_host}:${port}"
