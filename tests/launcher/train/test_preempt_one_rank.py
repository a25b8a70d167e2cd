"""Preemption through the real trainer (`notellm2 train`, tiny Llama + tiny CLIP, 2 CPU ranks, ZeRO-3):
SIGUSR1 reaches ONE rank only (a node agent may signal a single process); every rank must still
checkpoint the same step, exit 75, and the next run resume from that step."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from notellm2.launcher.train import checkpoint as ckpt
from tests.helpers.multirank import base_env, free_port
from tests.helpers.paths import REPO
from tests.helpers.real_inputs import TINY_CPU, tiny_cpu_overrides
from tests.helpers.runs import logged_steps

pytestmark = pytest.mark.slow


def _steps(run_dir: str) -> list[int]:
    return logged_steps(run_dir, missing_ok=True)


def _read(tmp_path) -> str:
    return "\n".join(f"--- {p.name}\n" + p.read_text()[-3000:] for p in sorted(tmp_path.glob("rank*.log")))


def test_one_rank_signalled_all_checkpoint_the_same_step_and_exit_75(tmp_path):
    run_dir = str(tmp_path / "run")
    overrides = tiny_cpu_overrides(str(tmp_path / "inputs")) + [
        f"train.output_dir={run_dir}", "train.max_steps=200", "checkpoint.every_steps=1000"]
    # Plain processes, one per rank (as srun starts them): each rank's own exit code is seen. (Under
    # torchrun the agent SIGTERMs the others as soon as the first rank exits 75, whatever they do.)
    args = [sys.executable, "-m", "notellm2.launcher", "train", "--config", TINY_CPU, *overrides]
    port = str(free_port())
    procs, logs = [], []
    for r in range(2):
        env = base_env({"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": port})
        logs.append(open(tmp_path / f"rank{r}.log", "w+"))
        procs.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=logs[r], stderr=subprocess.STDOUT))
    try:
        deadline = time.monotonic() + 240
        while len(_steps(run_dir)) < 2:
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, _read(tmp_path)
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGUSR1)  # one rank only
        codes = [p.wait(timeout=180) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [75, 75], _read(tmp_path)  # every rank stopped with the preemption code
    steps = _steps(run_dir)
    stopped_at = steps[-1]
    assert stopped_at < 200
    latest = ckpt.latest_complete(ckpt.checkpoint_root(run_dir))
    assert latest.endswith(ckpt.step_name(stopped_at)), (latest, stopped_at)
    with open(os.path.join(latest, "manifest.json")) as fh:
        manifest = json.load(fh)
    assert manifest["step"] == stopped_at and len(manifest["reader_states"]) == 2
    assert all(os.path.exists(os.path.join(latest, f"rank{r:05d}.json")) for r in range(2))

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args[1:-2]]
    resumed = subprocess.run(cmd + [f"train.max_steps={stopped_at + 2}", "checkpoint.every_steps=1000"],
                             cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed step {stopped_at}" in resumed.stdout + resumed.stderr
    assert logged_steps(run_dir)[-1] == stopped_at + 2
