"""Run code under N real ranks on CPU (torchrun --standalone, gloo) with a hard timeout.

    result = run_ranks("tests.dist_cases:gathered_loss_grads", nproc=2, timeout=120, kwargs={...})
    result = run_command(["notellm2", "train", ...], nproc=2, timeout=300)

A rank that hangs or dies fails the test within `timeout` seconds; the failure message holds
every rank's own output (torchrun --tee into a per-rank log file). Functions run in every rank
with `torch.distributed` already initialised (gloo); their return value (JSON-able) is collected
per rank in `result.returns`.
"""
from __future__ import annotations

import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import pytest

from tests.helpers.paths import REPO, repo_path

RANK_ENTRY = repo_path("tests/helpers/rank_entry.py")  # a script: torchrun runs it by path
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


@dataclass
class RankResult:
    returncode: int
    output: str  # the launcher's console (rank-prefixed lines)
    rank_logs: dict = field(default_factory=dict)  # rank -> that rank's own stdout+stderr
    returns: dict = field(default_factory=dict)  # rank -> the function's return value
    elapsed: float = 0.0

    def rank_exit_codes(self) -> dict:
        """rank -> exit code, from torchrun's failure report (it lists the ranks that exited non-zero)."""
        return {int(r): int(c) for r, c in re.findall(r"rank\s*:\s*(\d+) \(local_rank[^\n]*\n\s*exitcode\s*:\s*(-?\d+)",
                                                      self.output)}

    def describe(self) -> str:
        parts = [f"returncode={self.returncode} elapsed={self.elapsed:.1f}s", "--- launcher output ---", self.output[-6000:]]
        for rank in sorted(self.rank_logs):
            parts += [f"--- rank {rank} ---", self.rank_logs[rank][-6000:]]
        return "\n".join(parts)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.update(extra or {})
    return env


def _collect_rank_logs(log_dir: str) -> dict:
    logs = {}
    for path in sorted(glob.glob(os.path.join(log_dir, "**", "attempt_*", "*", "*.log"), recursive=True)):
        rank = int(os.path.basename(os.path.dirname(path)))
        with open(path, errors="replace") as fh:
            logs[rank] = logs.get(rank, "") + fh.read()
    return logs


def kill_tree(pid: int) -> list[int]:
    """SIGKILL `pid`, its process group and every process below it; returns the PIDs killed.

    torchrun starts each rank in a session of its own (its subprocess handler passes start_new_session),
    so killing torchrun's process group alone missed the ranks: two ranks of harness_cases:rank1_hangs were
    still alive 15 minutes after a suite ended. The tree is frozen first (SIGSTOP), so that nothing in it
    forks a process (a loader worker) between the listing and the kill, then listed again and killed."""
    import psutil

    def tree() -> list:
        try:
            root = psutil.Process(pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    for p in tree():
        try:
            p.suspend()
        except psutil.Error:
            pass
    procs = tree()
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
    psutil.wait_procs(procs, timeout=10)
    return [p.pid for p in procs]


def launch(cmd: list[str], timeout: float, env: dict | None = None, cwd: str | None = None) -> tuple[int, str, float]:
    """Run `cmd` in its own process group; on timeout kill it and every process below it (kill_tree).
    Returns (rc, output, elapsed)."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd or REPO,
                            start_new_session=True, text=True, errors="replace")
    try:
        out, _ = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        killed = kill_tree(proc.pid)
        out, _ = proc.communicate()
        rc = -9
        out += f"\n[multirank] TIMEOUT after {timeout}s: killed the launcher and every process below it ({len(killed)})\n"
    return rc, out, time.monotonic() - start


def run_command(args: list[str], nproc: int = 2, timeout: float = 300, env: dict | None = None,
                check: bool = True, nnodes: int = 1, node_rank: int = 0, rdzv: str | None = None,
                cwd: str | None = None, torchrun_args: tuple = ()) -> RankResult:
    """Run a Python module/script command line under torchrun with `nproc` ranks.

    `args` is what follows `torchrun ...`: e.g. ["-m", "notellm2.launcher", "train", "--config", c] or a script path.
    `torchrun_args` go to torchrun itself (e.g. ("--monitor-interval", "5"): torchrun looks at its ranks
    every 0.1 s by default and SIGTERMs the others as soon as one exits non-zero; a longer interval lets every
    rank of a run that stops on purpose, all with the same code, report its own).
    """
    log_dir = tempfile.mkdtemp(prefix="multirank-")
    if nnodes == 1 and rdzv is None:
        topo = ["--standalone"]
    else:
        topo = ["--nnodes", str(nnodes), "--node-rank", str(node_rank), "--rdzv-backend", "c10d",
                "--rdzv-endpoint", rdzv or f"127.0.0.1:{free_port()}", "--rdzv-id", "multirank"]
    cmd = [TORCHRUN, *topo, "--nproc-per-node", str(nproc), "--log-dir", log_dir, "--tee", "3",
           "--max-restarts", "0", *torchrun_args, *args]
    rc, out, elapsed = launch(cmd, timeout, base_env(env), cwd)
    result = RankResult(rc, out, _collect_rank_logs(log_dir), elapsed=elapsed)
    if check and rc != 0:
        pytest.fail(f"multi-rank command failed: {' '.join(cmd)}\n{result.describe()}", pytrace=False)
    return result


def run_ranks(target: str, nproc: int = 2, timeout: float = 120, kwargs: dict | None = None,
              env: dict | None = None, check: bool = True) -> RankResult:
    """Run `module:function(**kwargs)` in every rank after gloo init; collect return values."""
    out_dir = tempfile.mkdtemp(prefix="multirank-ret-")
    args = [RANK_ENTRY, target, json.dumps(kwargs or {}), out_dir]
    result = run_command(args, nproc=nproc, timeout=timeout, env=env, check=check)
    for path in glob.glob(os.path.join(out_dir, "rank*.json")):
        with open(path) as fh:
            result.returns[int(os.path.basename(path)[4:-5])] = json.load(fh)
    if check and len(result.returns) != nproc:
        pytest.fail(f"{target}: only ranks {sorted(result.returns)} returned\n{result.describe()}", pytrace=False)
    return result
