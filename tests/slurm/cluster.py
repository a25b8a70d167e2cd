"""A real single-node Slurm for tests: installed with apt-get when missing, started with
slurm/local_cluster.sh in a temp dir, stopped (by pid files) when the fixture ends."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time

import pytest

from tests.helpers.multirank import free_port
from tests.helpers.paths import REPO

LOCAL_CLUSTER = os.path.join(REPO, "slurm", "local_cluster.sh")
TRAIN_SBATCH = os.path.join(REPO, "slurm", "train.sbatch")
RENDEZVOUS = os.path.join(REPO, "slurm", "rendezvous.sh")
NEEDED = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel")


def ensure_slurm_installed() -> None:
    """apt-get the Debian Slurm + munge packages if any command is missing; skip without root/apt."""
    if all(shutil.which(x) for x in NEEDED):
        return
    if os.geteuid() != 0:
        pytest.skip("Slurm/munge are not installed and installing them needs root")
    if not shutil.which("apt-get"):
        pytest.skip("Slurm/munge are not installed and there is no apt-get to install them")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "slurmctld", "slurmd", "slurm-client", "munge"]):
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if p.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed (rc {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}", pytrace=False)
    missing = [x for x in NEEDED if not shutil.which(x)]
    if missing:
        pytest.fail(f"after apt-get install, still missing: {missing}", pytrace=False)


class LocalCluster:
    def __init__(self, root: str) -> None:
        self.root = root
        self.conf = os.path.join(root, "slurm.conf")
        self.env = dict(os.environ, SLURM_CONF=self.conf)
        for k in [k for k in self.env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
            del self.env[k]  # a test run inside a Slurm job must not leak its job's variables

    def run(self, *cmd: str, env: dict | None = None, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        p = subprocess.run(list(cmd), env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed (rc {p.returncode}):\n{p.stdout}\n{p.stderr}\n{self.logs()}", pytrace=False)
        return p

    def logs(self) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = os.path.join(self.root, "log", name)
            if os.path.exists(path):
                with open(path, errors="replace") as fh:
                    out.append(f"--- {name} (tail) ---\n{fh.read()[-3000:]}")
        return "\n".join(out)

    def job_field(self, job_id: str, key: str) -> str:
        text = self.run("scontrol", "show", "job", job_id).stdout
        for token in text.split():
            if token.startswith(key + "="):
                return token.split("=", 1)[1]
        raise KeyError(f"{key} not in scontrol show job {job_id}:\n{text}")

    def wait_gone(self, job_id: str, timeout: float) -> None:
        """Wait until the job has left the queue (finished, failed or cancelled)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.run("squeue", "-h", "-j", job_id, "-o", "%T", check=False).stdout.strip():
                return
            time.sleep(0.5)
        self.run("scancel", job_id, check=False)
        pytest.fail(f"job {job_id} still queued/running after {timeout}s; cancelled\n{self.logs()}", pytrace=False)


def start_cluster() -> LocalCluster:
    ensure_slurm_installed()
    root = tempfile.mkdtemp(prefix="notellm2-slurm-", dir="/tmp")
    os.chmod(root, 0o755)
    cluster = LocalCluster(root)
    env = {"LOCAL_SLURM_CTLD_PORT": str(free_port()), "LOCAL_SLURM_D_PORT": str(free_port()),
           "LOCAL_SLURM_CPUS": str(max(2, os.cpu_count() or 2))}
    p = cluster.run(LOCAL_CLUSTER, "start", root, env=env, timeout=90, check=False)
    if p.returncode != 0:
        subprocess.run([LOCAL_CLUSTER, "stop", root], capture_output=True, timeout=60)
        pytest.fail(f"local_cluster.sh start failed:\n{p.stdout}\n{p.stderr}\n{cluster.logs()}", pytrace=False)
    return cluster


def stop_cluster(cluster: LocalCluster) -> None:
    cluster.run("scancel", "--user", "root", check=False)  # only this cluster's jobs (SLURM_CONF)
    subprocess.run([LOCAL_CLUSTER, "stop", cluster.root], capture_output=True, timeout=90)
    shutil.rmtree(cluster.root, ignore_errors=True)
