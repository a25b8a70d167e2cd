"""Functions run in every rank by tests.helpers.multirank.run_ranks (gloo already initialised)."""
from __future__ import annotations

import os
import signal

import torch.distributed as dist

from notellm2.launcher.train.metrics import StepStats
from notellm2.launcher.train.preemption import PreemptionFlag


def stop_agreed_across_ranks(signal_rank: int, signal_step: int, steps: int) -> dict:
    flag = PreemptionFlag.install()
    try:
        stopped_at = None
        local_at = None
        for step in range(1, steps + 1):
            if dist.get_rank() == signal_rank and step == signal_step:
                os.kill(os.getpid(), signal.SIGUSR1)  # what torchrun forwards from Slurm's warning
            if flag.requested and local_at is None:
                local_at = step
            stats = StepStats()
            stats.stop_asked = float(flag.requested)  # the trainer's path: the flag rides the step's all-reduce
            if flag.agree(stats.all_reduced().stop_asked > 0):
                stopped_at = step
                break
        return {"stopped_at": stopped_at, "local_at": local_at, "signal": flag.signal_name}
    finally:
        flag.uninstall()
