"""The one Slurm host-list parser (notellm2/hostlist.py): the forms `scontrol show hostnames` expands,
the same head node through the launcher's topology and through slurm/rendezvous.sh, and scontrol itself
as the oracle where Slurm's client is installed (a minimal slurm.conf; no daemon is needed)."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from notellm2.hostlist import HostListError, expand, first_host
from notellm2.errors import UserError
from notellm2.launcher.distributed import detect_topology
from tests.helpers.paths import REPO

# node list -> every host, in scontrol's order (each row was printed by scontrol of Slurm 22.05)
TABLE = [
    ("localhost", ["localhost"]),
    ("a,b", ["a", "b"]),
    ("a,,b", ["a", "b"]),
    ("a b", ["a", "b"]),
    ("n[1-3]", ["n1", "n2", "n3"]),
    ("n[7]", ["n7"]),
    ("n[0-0]", ["n0"]),
    ("n[01-3]", ["n01", "n02", "n03"]),  # a range keeps its first number's width
    ("n[1-03]", ["n1", "n2", "n3"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),  # no padding: the numbers just grow
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("n[5,01]", ["n5", "n01"]),
    ("n[1-2,1]", ["n1", "n2", "n1"]),  # duplicates kept
    ("n[1-3,5-6]", ["n1", "n2", "n3", "n5", "n6"]),
    ("node[07-09,12],gpu3", ["node07", "node08", "node09", "node12", "gpu3"]),  # commas inside and outside
    ("n1,n[2-3],n4", ["n1", "n2", "n3", "n4"]),
    ("c[1-2],d[5],e", ["c1", "c2", "d5", "e"]),
    ("rack[3-4]-gpu[01-02],x", ["rack3-gpu01", "rack3-gpu02", "rack4-gpu01", "rack4-gpu02", "x"]),
    ("a[1,3]b[2-3]", ["a1b2", "a1b3", "a3b2", "a3b3"]),  # several groups: the first is outermost
    ("n[1-3]-[05-06]", ["n1-05", "n1-06", "n2-05", "n2-06", "n3-05", "n3-06"]),
]
BAD = ["n[2-1]", "n[1-2", "n]1[", "gpu-[1-2]-[a]", "n[[1-2]]", "n[1-]", "n[]"]


@pytest.mark.parametrize("nodelist,hosts", TABLE, ids=[t[0] for t in TABLE])
def test_expands_as_scontrol_does(nodelist, hosts):
    assert expand(nodelist) == hosts
    assert first_host(nodelist) == hosts[0]


@pytest.mark.parametrize("nodelist", BAD)
def test_malformed_lists_are_refused_naming_the_list(nodelist):
    with pytest.raises(HostListError, match="host list"):
        expand(nodelist)


def test_an_empty_list_names_no_host():
    assert expand("") == [] and expand(" , ") == []
    with pytest.raises(HostListError, match="names no host"):
        first_host(",")


def _rendezvous(nodelist: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RDZV_PORT", "SLURM_JOB_NODELIST")}
    return subprocess.run([os.path.join(REPO, "slurm", "rendezvous.sh"), nodelist, "7"], env=env,
                          capture_output=True, text=True, timeout=60)


def _slurm_topology(nodelist: str):
    return detect_topology({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "7",
                            "SLURM_JOB_NODELIST": nodelist})


def test_the_launcher_and_the_shell_helper_name_the_same_head_node():
    for nodelist in ("rack[3-4]-gpu[01-02],x", "node[07-09,12],gpu3", "n[098-101]", "a[1,3]b[2-3]", "localhost"):
        want = first_host(nodelist)
        assert _slurm_topology(nodelist).master_addr == want
        p = _rendezvous(nodelist)
        assert p.returncode == 0 and p.stdout.strip() == f"{want}:20007", p.stderr
    # a malformed list: one line from both, exit 2 from the script
    p = _rendezvous("n[2-1]")
    assert p.returncode == 2 and p.stdout == "" and p.stderr.strip().count("\n") == 0 and "n[2-1]" in p.stderr
    with pytest.raises(UserError, match=r"SLURM_JOB_NODELIST: host list 'n\[2-1\]'"):
        _slurm_topology("n[2-1]")


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="Slurm's scontrol is not installed")
def test_scontrol_is_the_oracle(tmp_path):
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=hostlist\nSlurmctldHost=localhost\nNodeName=localhost CPUs=1\n"
                    "PartitionName=p Nodes=localhost Default=YES\n")
    env = dict(os.environ, SLURM_CONF=str(conf))
    for nodelist, hosts in TABLE:
        p = subprocess.run(["scontrol", "show", "hostnames", nodelist], env=env, capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == 0 and p.stdout.split() == hosts == expand(nodelist), (nodelist, p.stdout, p.stderr)
