"""The requeue path of slurm/train.sbatch on a real single-node Slurm, with the small probe trainer
(tests/slurm/probe_trainer.py; the real `notellm2 train` under sbatch is in test_slurm_train.py):
the time-limit warning reaches every rank, they checkpoint and stop, the job requeues itself and
the next run resumes from that checkpoint."""
from __future__ import annotations

import json
import os
import time

import pytest

from tests.multirank import REPO, free_port
from tests.slurm.cluster import TRAIN_SBATCH

pytestmark = pytest.mark.slow
PROBE = "tests/slurm/probe_trainer.py"


def _metrics(run_dir: str, rank: int) -> list[dict]:
    path = os.path.join(run_dir, f"metrics.rank{rank}.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _submit(cluster, tmp_path, run_dir, overrides, wait=True, extra_env=None, train_cmd=PROBE, config=None):
    if config is None:
        config = tmp_path / "run.yaml"
        config.write_text("name: slurm-probe\n")
    env = {"REPO_DIR": REPO, "VENV": os.path.join(REPO, ".venv"), "CONFIG": str(config), "GPUS_PER_NODE": "2",
           "TRAIN_CMD": train_cmd, "RDZV_PORT": str(free_port()),
           "OVERRIDES": " ".join([f"train.output_dir={run_dir}", *overrides]), **(extra_env or {})}
    log = str(tmp_path / "job-%j.out")
    args = ["sbatch", "--parsable", "--chdir", REPO, "-o", log]
    if wait:
        args.append("--wait")
    p = cluster.run(*args, TRAIN_SBATCH, env=env, timeout=600, check=False)
    job_id = p.stdout.strip().split(";")[0]
    return p, job_id, log.replace("%j", job_id)


def _read(path: str) -> str:
    with open(path, errors="replace") as fh:
        return fh.read()


def test_time_limit_warning_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path):
    run_dir = str(tmp_path / "run")
    max_steps = 30
    p, job, log = _submit(slurm_cluster, tmp_path, run_dir, [f"train.max_steps={max_steps}", "checkpoint.every_steps=1000"],
                          wait=False, extra_env={"PROBE_STEP_SLEEP": "0.3"})
    assert p.returncode == 0 and job, p.stderr
    deadline = time.monotonic() + 120
    while len(_metrics(run_dir, 0)) < 3:
        assert time.monotonic() < deadline, f"job {job} made no progress\n{_read(log) if os.path.exists(log) else ''}"
        time.sleep(0.3)
    # What Slurm does 120 s before the time limit (--signal=B:USR1@120): USR1 to the batch shell only.
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", job)
    deadline = time.monotonic() + 120
    while slurm_cluster.job_field(job, "Restarts") != "1":
        assert time.monotonic() < deadline, f"job {job} was not requeued\n{_read(log)}"
        time.sleep(0.5)
    # The requeued job waits cred_expire seconds (10 in slurm/local_cluster.sh's slurm.conf), then runs again.
    slurm_cluster.wait_gone(job, timeout=240)
    out = _read(log)
    assert slurm_cluster.job_field(job, "JobState") == "COMPLETED", out
    assert "requeueing job" in out and "restart 1:" in out, out
    r0 = _metrics(run_dir, 0)
    steps = [m["step"] for m in r0]
    first_run = [m for m in r0 if m["start_step"] == 0]
    second_run = [m for m in r0 if m["start_step"] > 0]
    stopped_at = first_run[-1]["step"]
    assert 3 <= stopped_at < max_steps, out
    # The second run resumed exactly from the checkpoint written at the stop, and finished.
    assert {m["start_step"] for m in second_run} == {stopped_at}, out
    assert steps == list(range(1, max_steps + 1)), out
    # Both ranks stopped after the same step (the flag is agreed through an all-reduce).
    assert [m["step"] for m in _metrics(run_dir, 1) if m["start_step"] == 0][-1] == stopped_at
