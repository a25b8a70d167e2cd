#!/bin/bash
# Print the torchrun rendezvous endpoint HOST:PORT of a Slurm job, one line.
#
#   slurm/rendezvous.sh [NODELIST [JOB_ID]]
#
# HOST is the first host of the job's node list (the node that runs the batch script and hosts
# the c10d store); NODELIST defaults to $SLURM_JOB_NODELIST. PORT is $RDZV_PORT when set, else
# 20000 + JOB_ID % 20000 (JOB_ID defaults to $SLURM_JOB_ID, else 0), so that two jobs sharing a
# head node do not collide. The node list is expanded by `scontrol show hostnames`; where
# scontrol cannot run (no slurm.conf, e.g. a laptop) a plain-bash fallback takes the first host
# of lists like "node[07-09,12],gpu3", "rack[3-4]-gpu[1-2]" or "localhost".
# Used by slurm/train.sbatch and by the tests (tests/slurm/), so both derive it the same way.
set -euo pipefail

nodelist="${1:-${SLURM_JOB_NODELIST:-}}"
job_id="${2:-${SLURM_JOB_ID:-0}}"
if [ -z "$nodelist" ]; then
    echo "rendezvous.sh: no node list (pass one or run inside a Slurm job with SLURM_JOB_NODELIST set)" >&2
    exit 2
fi

head_host=""
if command -v scontrol >/dev/null 2>&1; then
    head_host="$(scontrol show hostnames "$nodelist" 2>/dev/null | head -n1 || true)"
fi
if [ -z "$head_host" ]; then
    # The first top-level entry (commas inside brackets do not split), then every bracket group
    # replaced by its first number: "rack[3-4]-gpu[01-02],x" -> "rack3-gpu01".
    entry="" depth=0
    for ((i = 0; i < ${#nodelist}; i++)); do
        c="${nodelist:i:1}"
        case "$c" in
            "[") depth=$((depth + 1)) ;;
            "]") depth=$((depth - 1)) ;;
            ",") [ "$depth" -eq 0 ] && break ;;
        esac
        entry+="$c"
    done
    while [[ "$entry" =~ ^([^\[]*)\[([0-9]+)[^]]*\](.*)$ ]]; do
        entry="${BASH_REMATCH[1]}${BASH_REMATCH[2]}${BASH_REMATCH[3]}"
    done
    head_host="$entry"
fi
if ! [[ "$job_id" =~ ^[0-9]+$ ]]; then
    echo "rendezvous.sh: job id '$job_id' is not a number" >&2
    exit 2
fi
port="${RDZV_PORT:-$((20000 + job_id % 20000))}"
echo "${head_host}:${port}"
