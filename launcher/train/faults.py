"""Test-only fault hooks: environment variables that make one rank hang or die at a chosen point,
so that the tests can check what the other ranks, the watchdog and the checkpoints do then.
Nothing here runs unless a test sets one of these variables.

    NOTELLM2_TEST_HANG_AT=RANK:STEP            that rank sleeps forever at the start of STEP
    NOTELLM2_TEST_DIE_AT=RANK:STEP             that rank SIGKILLs itself at the start of STEP
    NOTELLM2_TEST_DIE_IN_SAVE=RANK:PHASE:STEP  that rank SIGKILLs itself inside the save of STEP;
        PHASE: after_shards (DeepSpeed files written, ours not) or before_manifest (all files, no manifest)
    NOTELLM2_TEST_USR1_AT=RANK:STEP            that rank sends itself SIGUSR1 (Slurm's warning before the
        time limit: the preemption path) at the start of STEP
"""
from __future__ import annotations

import os
import signal
import time

HANG_HOOK_ENV = "NOTELLM2_TEST_HANG_AT"
DIE_HOOK_ENV = "NOTELLM2_TEST_DIE_AT"
KILL_HOOK_ENV = "NOTELLM2_TEST_DIE_IN_SAVE"
USR1_HOOK_ENV = "NOTELLM2_TEST_USR1_AT"


def _hook_hit(env_name: str, rank: int, step: int) -> bool:
    spec = os.environ.get(env_name, "")
    if not spec:
        return False
    r, _, s = spec.partition(":")
    return int(r) == rank and int(s) == step


def at_step_start(rank: int, step: int) -> None:
    """The training loop calls this at the start of every step (HANG_HOOK_ENV, DIE_HOOK_ENV, USR1_HOOK_ENV)."""
    if _hook_hit(HANG_HOOK_ENV, rank, step):
        print(f"[test hook] rank {rank} hangs at step {step}", flush=True)
        while True:
            time.sleep(3600)
    if _hook_hit(DIE_HOOK_ENV, rank, step):
        print(f"[test hook] rank {rank} kills itself (SIGKILL) at step {step}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    if _hook_hit(USR1_HOOK_ENV, rank, step):
        print(f"[test hook] rank {rank} sends itself SIGUSR1 at step {step}", flush=True)
        os.kill(os.getpid(), signal.SIGUSR1)


def in_save(rank: int, phase: str, step: int) -> None:
    """checkpoint.save calls this at each PHASE of the save of STEP (KILL_HOOK_ENV)."""
    hook = os.environ.get(KILL_HOOK_ENV, "")
    if hook and hook == f"{rank}:{phase}:{step}":
        print(f"[test hook] rank {rank} kills itself during the save of step {step} ({phase})", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
