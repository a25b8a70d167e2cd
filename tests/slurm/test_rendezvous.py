"""Multi-node rendezvous without Slurm: two torchrun launchers on loopback act as two nodes
(--nnodes 2, node ranks 0 and 1), meeting at the endpoint slurm/rendezvous.sh derives from a node
list, exactly as slurm/train.sbatch does. Plus the helper's own parsing."""
from __future__ import annotations

import json
import os
import subprocess
import threading

import pytest

from tests.helpers.multirank import free_port, run_command
from tests.helpers.runs import logged_steps
from tests.slurm.cluster import RENDEZVOUS
from tests.helpers.real_inputs import TINY_CPU, tiny_cpu_overrides


def rendezvous(nodelist: str, job_id: str = "", port: int | None = None, path_without_scontrol: bool = False,
               slurm_conf: str | None = None) -> str:
    env = dict(os.environ)
    env.pop("RDZV_PORT", None)
    if port is not None:
        env["RDZV_PORT"] = str(port)
    if path_without_scontrol:
        env["PATH"] = "/usr/local/bin:/bin"  # a machine without Slurm's client tools: the parser needs none
    if slurm_conf:
        env["SLURM_CONF"] = slurm_conf
    args = [RENDEZVOUS, nodelist] + ([job_id] if job_id else [])
    p = subprocess.run(args, env=env, capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


CASES = [("gpu[07-09,12],login3", "123", None, "gpu07:20123"), ("rack[3-4]-gpu[01-02],x", "7", None, "rack3-gpu01:20007"),
         ("localhost", "40001", None, "localhost:20001"), ("nodeA,nodeB", "", 31337, "nodeA:31337")]


def test_rendezvous_helper_takes_the_first_host_without_slurm_tools():
    # notellm2/hostlist.py (the one parser; its table is tests/test_hostlist.py) needs only python3
    for nodelist, job, port, want in CASES:
        assert rendezvous(nodelist, job, port, path_without_scontrol=True) == want


def test_rendezvous_helper_with_scontrol_agrees(slurm_cluster):
    # scontrol, given the cluster's slurm.conf, expands the lists as the helper's parser does.
    env = dict(slurm_cluster.env)
    hosts = subprocess.run(["scontrol", "show", "hostnames", "rack[3-4]-gpu[01-02],x"], env=env, capture_output=True,
                           text=True, timeout=30).stdout.split()
    assert hosts[0] == "rack3-gpu01" and len(hosts) == 5
    for nodelist, job, port, want in CASES:
        assert rendezvous(nodelist, job, port, slurm_conf=slurm_cluster.conf) == want


def test_rendezvous_helper_rejects_a_missing_node_list():
    env = {k: v for k, v in os.environ.items() if k != "SLURM_JOB_NODELIST"}
    p = subprocess.run([RENDEZVOUS], env=env, capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "no node list" in p.stderr


def _two_nodes(args: list[str], endpoint: str, timeout: float = 300) -> list:
    results: list = [None, None]

    def node(rank: int) -> None:
        results[rank] = run_command(args, nproc=1, nnodes=2, node_rank=rank, rdzv=endpoint, timeout=timeout, check=False)

    threads = [threading.Thread(target=node, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for rank, r in enumerate(results):
        assert r is not None and r.returncode == 0, f"node {rank}:\n{r.describe() if r else 'no result'}"
    return results


@pytest.mark.slow
def test_two_launchers_as_two_nodes_train_together(tmp_path):
    endpoint = rendezvous("localhost", port=free_port())
    assert endpoint.startswith("localhost:")
    run_dir = str(tmp_path / "run")
    args = ["-m", "notellm2.launcher", "train", "--config", TINY_CPU, *tiny_cpu_overrides(str(tmp_path / "inputs")),
            f"train.output_dir={run_dir}", "train.max_steps=3", "checkpoint.every_steps=3"]
    results = _two_nodes(args, endpoint)
    with open(os.path.join(run_dir, "checkpoints", "step_00000003", "manifest.json")) as fh:
        manifest = json.load(fh)
    assert manifest["world_size"] == 2 and manifest["step"] == 3
    # One rank per launcher: exactly one of them hosts global rank 0 (with the c10d backend the
    # rendezvous, not --node-rank, orders the nodes).
    assert sum("[rank 0] done: step 3" in r.output for r in results) == 1, [r.output[-2000:] for r in results]
    assert logged_steps(run_dir) == [1, 2, 3]
