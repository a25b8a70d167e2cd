"""The real `notellm2 train` (TRAIN_CMD's default) under slurm/train.sbatch on a local Slurm:
2 CPU ranks on one node train configs/tiny_cpu.yaml, checkpoint, and a second submission resumes."""
from __future__ import annotations

import json
import os

import pytest

from tests.multirank import REPO, free_port
from tests.slurm.cluster import TRAIN_SBATCH
from tests.slurm.real_inputs import TINY_CPU, tiny_cpu_overrides

pytestmark = pytest.mark.slow


def _submit(cluster, tmp_path, overrides: list[str], tag: str):
    env = {"REPO_DIR": REPO, "VENV": os.path.join(REPO, ".venv"), "CONFIG": TINY_CPU, "GPUS_PER_NODE": "2",
           "RDZV_PORT": str(free_port()), "OVERRIDES": " ".join(overrides)}
    log = str(tmp_path / f"{tag}-%j.out")
    p = cluster.run("sbatch", "--parsable", "--wait", "--chdir", REPO, "-o", log, TRAIN_SBATCH, env=env, timeout=600, check=False)
    job = p.stdout.strip().split(";")[0]
    path = log.replace("%j", job)
    out = open(path, errors="replace").read() if os.path.exists(path) else ""
    return p.returncode, out


def _steps(run_dir: str) -> list[int]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line)["step"] for line in fh if line.strip()]


def test_sbatch_runs_notellm2_train_and_resumes(slurm_cluster, tmp_path):
    run_dir = str(tmp_path / "run")
    base = tiny_cpu_overrides(str(tmp_path / "inputs")) + [f"train.output_dir={run_dir}", "checkpoint.every_steps=2"]
    rc, out = _submit(slurm_cluster, tmp_path, base + ["train.max_steps=4"], "first")
    assert rc == 0, out
    assert "1 node(s) x 2 rank(s)" in out and "training step ended with exit code 0" in out, out
    with open(os.path.join(run_dir, "checkpoints", "step_00000004", "manifest.json")) as fh:
        manifest = json.load(fh)
    assert manifest["step"] == 4 and manifest["world_size"] == 2
    assert _steps(run_dir) == [1, 2, 3, 4]

    rc, out = _submit(slurm_cluster, tmp_path, base + ["train.max_steps=6"], "second")
    assert rc == 0, out
    assert "resumed step 4 from" in out, out
    assert _steps(run_dir) == [1, 2, 3, 4, 5, 6]
