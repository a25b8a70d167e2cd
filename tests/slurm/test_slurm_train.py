"""The real `notellm2 train` (TRAIN_CMD's default) under slurm/train.sbatch on a local Slurm, 2 CPU
ranks on one node with configs/tiny_cpu.yaml:

* it trains and checkpoints, and a second submission resumes from the checkpoint;
* the time-limit warning (USR1 to the batch shell, what `--signal=B:USR1@120` sends) reaches the
  ranks, they checkpoint and stop, the job requeues itself and the next run resumes to the end.
"""
from __future__ import annotations

import json
import os
import re
import time

import pytest

from tests.helpers.multirank import free_port
from tests.helpers.paths import REPO
from tests.helpers.runs import logged_steps
from tests.slurm.cluster import TRAIN_SBATCH
from tests.helpers.real_inputs import TINY_CPU, tiny_cpu_overrides

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory):
    return tiny_cpu_overrides(str(tmp_path_factory.mktemp("tiny-inputs")))


def _submit(cluster, tmp_path, overrides: list[str], tag: str, wait: bool = True):
    env = {"REPO_DIR": REPO, "VENV": os.path.join(REPO, ".venv"), "CONFIG": TINY_CPU, "GPUS_PER_NODE": "2",
           "RDZV_PORT": str(free_port()), "OVERRIDES": " ".join(overrides)}
    log = str(tmp_path / f"{tag}-%j.out")
    args = ["sbatch", "--parsable", "--chdir", REPO, "-o", log] + (["--wait"] if wait else [])
    p = cluster.run(*args, TRAIN_SBATCH, env=env, timeout=600, check=False)
    job = p.stdout.strip().split(";")[0]
    return p, job, log.replace("%j", job)


def _read(path: str) -> str:
    return open(path, errors="replace").read() if os.path.exists(path) else ""


def _steps(run_dir: str) -> list[int]:
    return logged_steps(run_dir, missing_ok=True)


def test_sbatch_runs_notellm2_train_and_resumes(slurm_cluster, tmp_path, tiny_inputs):
    run_dir = str(tmp_path / "run")
    base = tiny_inputs + [f"train.output_dir={run_dir}", "checkpoint.every_steps=2"]
    p, job, log = _submit(slurm_cluster, tmp_path, base + ["train.max_steps=4"], "first")
    out = _read(log)
    assert p.returncode == 0, f"{p.stderr}\n{out}"
    assert "1 node(s) x 2 rank(s)" in out and "training step ended with exit code 0" in out, out
    with open(os.path.join(run_dir, "checkpoints", "step_00000004", "manifest.json")) as fh:
        manifest = json.load(fh)
    assert manifest["step"] == 4 and manifest["world_size"] == 2
    assert _steps(run_dir) == [1, 2, 3, 4]

    p, job, log = _submit(slurm_cluster, tmp_path, base + ["train.max_steps=6"], "second")
    out = _read(log)
    assert p.returncode == 0, out
    assert "resumed step 4 from" in out, out
    assert _steps(run_dir) == [1, 2, 3, 4, 5, 6]


def test_time_limit_warning_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path, tiny_inputs):
    run_dir = str(tmp_path / "run")
    max_steps = 40
    p, job, log = _submit(slurm_cluster, tmp_path, tiny_inputs + [f"train.output_dir={run_dir}", f"train.max_steps={max_steps}",
                                                                  "checkpoint.every_steps=1000"], "warned", wait=False)
    assert p.returncode == 0 and job, p.stderr
    deadline = time.monotonic() + 180
    while len(_steps(run_dir)) < 2:
        assert time.monotonic() < deadline, f"job {job} made no progress\n{_read(log)}\n{slurm_cluster.logs()}"
        time.sleep(0.2)
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", job)
    deadline = time.monotonic() + 180
    while slurm_cluster.job_field(job, "Restarts") != "1":
        assert time.monotonic() < deadline, f"job {job} was not requeued\n{_read(log)}"
        time.sleep(0.5)
    # The requeued job waits cred_expire seconds (10 in local_cluster.sh's slurm.conf), then runs again.
    slurm_cluster.wait_gone(job, timeout=300)
    out = _read(log)
    assert slurm_cluster.job_field(job, "JobState") == "COMPLETED", out
    assert "requeueing job" in out and "restart 1:" in out, out
    stop = [line for line in out.splitlines() if "stop requested (SIGUSR1): checkpoint of step" in line]
    assert len(stop) == 1, out
    stopped_at = int(re.search(r"checkpoint of step (\d+) written", stop[0]).group(1))
    assert 2 <= stopped_at < max_steps, out
    assert f"resumed step {stopped_at} from" in out, out
    assert _steps(run_dir) == list(range(1, max_steps + 1)), out
