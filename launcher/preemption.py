"""Graceful stop on preemption: checkpoint at the next step boundary, then exit with a known code.

Slurm warns a job before its time limit (`#SBATCH --signal=B:USR1@120`); `slurm/train.sbatch`
forwards that warning to every trainer process as SIGUSR1 (through torchrun). A scheduler that
cancels or preempts a job sends SIGTERM. Either signal only sets a flag here: the training loop
finishes the step it is in, agrees with the other ranks that it must stop, writes a checkpoint
and exits with PREEMPTED_EXIT_CODE. The batch script then requeues the job, and the new run
resumes with `checkpoint.resume: auto`.

How the training loop uses it (every rank, every step):

    flag = PreemptionFlag.install()            # once, in the main thread, before the loop
    for step in ...:
        ... one optimizer step ...
        if flag.should_stop():                 # collective: every rank calls it at each boundary
            save_checkpoint(...)
            flag.exit()                        # sys.exit(PREEMPTED_EXIT_CODE)

`flag.requested` is this process's own view (a signal arrived here). The signal reaches the ranks
at slightly different times, so one rank may see it a step before another; `should_stop()`
all-reduces the flag (MAX) so that every rank stops after the same step and the checkpoint's
collectives line up. Without an initialised process group it is just `requested`.

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

    def should_stop(self) -> bool:
        """Whether ANY rank was asked to stop; a collective that every rank must call at each step boundary."""
        local = self.requested
        try:
            import torch

            from launcher.distributed import ReduceOp, all_reduce, is_distributed
        except ImportError:  # pragma: no cover - torch is a hard dependency of the trainer
            return local
        if not is_distributed():
            return local
        t = all_reduce(torch.tensor([1 if local else 0], dtype=torch.int32), op=ReduceOp.MAX)
        agreed = bool(t.item())
        if agreed and not local:
            self.request("another rank was asked to stop")
        return agreed

    def exit(self) -> None:
        """End the process with PREEMPTED_EXIT_CODE (call after the checkpoint is written)."""
        sys.stdout.flush()
        sys.stderr.flush()
        raise SystemExit(PREEMPTED_EXIT_CODE)


class Preempted(Exception):
    """Training stopped early on request, after a checkpoint; the process exits with code 75."""

    def __init__(self, step: int):
        super().__init__(f"stopped after step {step} on request")
        self.step = step


def install_for_training() -> Optional[PreemptionFlag]:
    """The trainer's flag: SIGUSR1 (Slurm's warning before the time limit) always; SIGTERM (scancel,
    preemption) only under Slurm: under torchrun alone SIGTERM is how the agent ends the ranks when one
    of them died. None outside the main thread (signals cannot be installed there)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    sigs = (signal.SIGUSR1, signal.SIGTERM) if os.environ.get("SLURM_JOB_ID") else (signal.SIGUSR1,)
    return PreemptionFlag.install(signals=sigs)
