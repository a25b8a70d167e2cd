"""Graceful stop on preemption: checkpoint at the next step boundary, then exit with a known code.

Slurm warns a job before its time limit (`#SBATCH --signal=B:USR1@120`); `slurm/train.sbatch`
forwards that warning to every trainer process as SIGUSR1 (through torchrun). A scheduler that
cancels or preempts a job sends SIGTERM. Either signal only sets a flag here: the training loop
finishes the step it is in, agrees with the other ranks that it must stop, writes a checkpoint
and exits with PREEMPTED_EXIT_CODE. The batch script then requeues the job, and the new run
resumes with `checkpoint.resume: auto`.

One path, used by the training loop (every rank, every step):

    flag = install_for_training()              # once, in the main thread, before the loop
    for step in ...:
        ... one optimizer step ...
        stats.stop_asked = float(flag.requested)     # this rank's own view, no collective
        summed = stats.all_reduced()                 # the step's ONE all-reduce (launcher/train/metrics.py)
        if flag.agree(summed.stop_asked > 0):        # did any rank get the signal?
            checkpointer.save(step, ...)
            raise Preempted(step)              # `notellm2 train` turns it into exit code 75

The signal reaches the ranks at slightly different times, so one rank may see it a step before
another. Folding the flag into the step's all-reduce (a sum, so "any rank") makes every rank stop
after the same step, so the checkpoint's collectives line up, and costs no collective of its own.

A stop can also be asked for through a file: if the environment variable NOTELLM2_STOP_FILE names
a path and that file exists, the flag counts as set (useful where signals cannot be routed).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Iterable, Optional

# sysexits.h EX_TEMPFAIL: "temporary failure, the user is invited to retry". Distinct from 0
# (finished), 1 (crash) and the distributed watchdog's 3.
PREEMPTED_EXIT_CODE = 75
STOP_FILE_ENV = "NOTELLM2_STOP_FILE"
DEFAULT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionFlag:
    """Records that a stop was requested by a signal (or a stop file); see the module docstring."""

    _installed: Optional["PreemptionFlag"] = None

    def __init__(self, stop_file: Optional[str] = None) -> None:
        self._event = threading.Event()
        self.signal_name: Optional[str] = None
        self.stop_file = stop_file if stop_file is not None else (os.environ.get(STOP_FILE_ENV) or None)
        self._previous: dict = {}

    # ------------------------------------------------------------------ installing
    @classmethod
    def install(cls, signals: Iterable[int] = DEFAULT_SIGNALS, stop_file: Optional[str] = None) -> "PreemptionFlag":
        """Install handlers for `signals` (default SIGUSR1 and SIGTERM) and return the flag.

        Must be called from the main thread (Python delivers signals there). Calling it again
        returns the flag already installed.
        """
        if cls._installed is not None:
            return cls._installed
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionFlag.install() must be called from the main thread")
        flag = cls(stop_file=stop_file)
        for sig in signals:
            flag._previous[sig] = signal.signal(sig, flag._on_signal)
        cls._installed = flag
        return flag

    def uninstall(self) -> None:
        """Restore the previous handlers (tests, or a process that trains twice)."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
        if PreemptionFlag._installed is self:
            PreemptionFlag._installed = None

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        # Only record: checkpointing inside a signal handler would run in the middle of a step.
        if not self._event.is_set():
            self.signal_name = signal.Signals(signum).name
            print(f"[preemption] {self.signal_name} received: will checkpoint at the next step boundary and exit "
                  f"with code {PREEMPTED_EXIT_CODE}", file=sys.stderr, flush=True)
        self._event.set()

    # ------------------------------------------------------------------ asking
    def request(self, reason: str = "requested") -> None:
        """Set the flag from code (what a signal does)."""
        self.signal_name = self.signal_name or reason
        self._event.set()

    @property
    def requested(self) -> bool:
        """True once this process got a stop signal (or the stop file exists). Local, no collective."""
        if not self._event.is_set() and self.stop_file and os.path.exists(self.stop_file):
            self.request(f"stop file {self.stop_file}")
        return self._event.is_set()

    def agree(self, any_rank_asked: bool) -> bool:
        """Record the ranks' agreement, as read from the step's all-reduce of `requested`, and return it.

        A rank that was not signalled itself but stops because another rank was notes that as its reason."""
        if any_rank_asked and not self._event.is_set():
            self.request("another rank was asked to stop")
        return bool(any_rank_asked)


class Preempted(Exception):
    """Training stopped early on request, after a checkpoint; `notellm2 train` exits with `exit_code` (75)."""

    exit_code = PREEMPTED_EXIT_CODE

    def __init__(self, step: int):
        super().__init__(f"stopped after step {step} on request")
        self.step = step


def install_for_training() -> PreemptionFlag:
    """The trainer's flag: SIGUSR1 (Slurm's warning before the time limit) always; SIGTERM (scancel,
    preemption) only under Slurm: under torchrun alone SIGTERM is how the agent ends the ranks when one
    of them died. Outside the main thread (signals cannot be installed there) the flag has no handlers;
    the stop file and the other ranks' agreement still work."""
    if threading.current_thread() is not threading.main_thread():
        return PreemptionFlag()
    sigs = (signal.SIGUSR1, signal.SIGTERM) if os.environ.get("SLURM_JOB_ID") else (signal.SIGUSR1,)
    return PreemptionFlag.install(signals=sigs)
