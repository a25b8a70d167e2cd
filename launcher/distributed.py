"""Process topology, process-group start-up and the stuck/dead-rank watchdog.

Ranks come from torchrun / the deepspeed launcher (RANK, LOCAL_RANK, WORLD_SIZE) or from Slurm
(SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS). The rendezvous is MASTER_ADDR / MASTER_PORT (under
Slurm MASTER_ADDR defaults to the first host of SLURM_JOB_NODELIST when it is a plain name).

The watchdog: every rank publishes, in the process group's TCPStore, a heartbeat (wall time,
refreshed by a thread) and the step its training loop has reached. When a rank's own loop makes
no progress for `timeout_s`, its watchdog reads every rank's record, prints which ranks are
behind or silent, and ends the process with exit code 3, so that the launcher tears the job down
instead of hanging. The gloo process-group timeout is set a little longer as a second line.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

WATCHDOG_EXIT_CODE = 3


@dataclass
class Topology:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "slurm" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _first_slurm_host(nodelist: str) -> Optional[str]:
    # "node[01-03,07],gpu5" -> "node01"; a plain "localhost" -> "localhost".
    m = re.match(r"^([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        return None
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def detect_topology(env: Optional[dict] = None) -> Topology:
    """Read rank, local rank, world size and the rendezvous address from the environment."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        source = "torchrun"
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        source = "slurm"
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", 0))
    else:
        source = "single"
        rank, world, local = 0, 1, 0
    addr = env.get("MASTER_ADDR")
    if not addr and source == "slurm":
        addr = _first_slurm_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", ""))) or None
    addr = addr or "127.0.0.1"
    port = env.get("MASTER_PORT") or ("29500" if source != "slurm" else str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    if world < 1 or not 0 <= rank < world:
        raise RuntimeError(f"bad rank layout from {source} environment: rank={rank} world_size={world}")
    return Topology(rank, local, world, addr, int(port), source)


def _skip_shm_build() -> None:
    """DeepSpeed compiles a shared-memory all-reduce op in init_distributed (~90 s) that only serves
    inference. Replace its builder with a no-op (FACTS: identical losses)."""
    import deepspeed.comm.torch  # noqa: F401  (makes sure the module is in sys.modules)
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def init_distributed(topo: Topology, timeout_s: float) -> str:
    """Start torch.distributed + DeepSpeed comm; returns the backend name."""
    os.environ.setdefault("RANK", str(topo.rank))
    os.environ.setdefault("LOCAL_RANK", str(topo.local_rank))
    os.environ.setdefault("WORLD_SIZE", str(topo.world_size))
    os.environ.setdefault("MASTER_ADDR", topo.master_addr)
    os.environ.setdefault("MASTER_PORT", str(topo.master_port))
    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(topo.local_rank)
    _skip_shm_build()
    import deepspeed

    if not dist.is_initialized():
        dist.init_process_group(backend, rank=topo.rank, world_size=topo.world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return backend


def default_store():
    return dist.distributed_c10d._get_default_store()


class Watchdog:
    """Heartbeats + step progress per rank in the TCPStore; ends the job when this rank's loop stalls."""

    def __init__(self, rank: int, world_size: int, timeout_s: float, store=None, poll_s: float = 1.0,
                 log=print):
        self.rank, self.world_size, self.timeout_s = rank, world_size, float(timeout_s)
        self.store = store if store is not None else dist.PrefixStore("notellm2-watchdog/", default_store())
        self.poll_s = poll_s
        self.log = log
        self.step = -1
        self.phase = "start"
        self.armed = False
        self._last_progress = time.monotonic()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._publish()

    # -- called by the training loop
    def progress(self, step: int, phase: str = "step", arm: bool = False) -> None:
        """Record progress. The timeout is enforced once armed (the loop arms it at its first step:
        start-up, model loading and a resume may legitimately take longer; their collectives are
        bounded by the process-group timeout)."""
        self.step, self.phase = step, phase
        self._last_progress = time.monotonic()
        self.armed = self.armed or arm
        self._publish()

    def mark_failed(self, message: str) -> None:
        try:
            self.store.set(f"failed/{self.rank}", message[-500:])
        except Exception:
            pass

    def start(self) -> "Watchdog":
        self._thread = threading.Thread(target=self._run, name="notellm2-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # -- internals
    def _publish(self) -> None:
        record = {"t": time.time(), "step": self.step, "phase": self.phase, "pid": os.getpid()}
        try:
            self.store.set(f"hb/{self.rank}", json.dumps(record))
        except Exception:
            pass

    def read_all(self) -> dict:
        """rank -> heartbeat record (None when missing or the store is unreachable)."""
        out = {}
        for r in range(self.world_size):
            try:
                if self.store.check([f"hb/{r}"]):
                    out[r] = json.loads(self.store.get(f"hb/{r}"))
                else:
                    out[r] = None
                if self.store.check([f"failed/{r}"]):
                    (out[r] or {}).update(failed=self.store.get(f"failed/{r}").decode(errors="replace"))
            except Exception:
                out[r] = None
        return out

    def diagnose(self, exclude: tuple = ()) -> str:
        """A one-paragraph account of which ranks stopped making progress (`exclude`: ranks not to
        blame, e.g. the caller whose collective failed because of a peer)."""
        records = self.read_all()
        now = time.time()
        silent = [r for r, rec in records.items() if rec is None or now - rec["t"] > max(5.0, 5 * self.poll_s)]
        failed = [r for r, rec in records.items() if rec and rec.get("failed")]
        steps = {r: rec["step"] for r, rec in records.items() if rec is not None}
        behind = []
        if steps:
            top = max(steps.values())
            behind = sorted(r for r, s in steps.items() if s < top)
        silent = [r for r in silent if r not in exclude]
        failed = [r for r in failed if r not in exclude]
        behind = [r for r in behind if r not in exclude]
        culprits = sorted(set(silent) | set(failed) | set(behind))
        parts = []
        if failed:
            parts.append("failed: " + "; ".join(f"rank {r}: {records[r]['failed']}" for r in failed))
        if silent:
            parts.append("no heartbeat (dead or unreachable): " + ", ".join(f"rank {r}" for r in silent))
        if behind:
            parts.append("behind (never reached the collective: stuck or dead): " + ", ".join(
                f"rank {r} at step {steps[r]} ({records[r]['phase']})" for r in behind))
        if not culprits:
            parts.append("all ranks alive at the same step; a collective is stuck on every rank")
        detail = ", ".join(f"rank {r}: " + (f"step {rec['step']} {rec['phase']}, heartbeat {now - rec['t']:.0f}s ago"
                                            if rec else "no record") for r, rec in sorted(records.items()))
        who = ("rank(s) " + ", ".join(str(r) for r in culprits)) if culprits else "no single rank"
        return f"{who} stopped reporting: " + "; ".join(parts) + f" [{detail}]"

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._publish_heartbeat_only()
            stalled = time.monotonic() - self._last_progress
            if self.armed and stalled > self.timeout_s:
                try:
                    msg = self.diagnose()
                except Exception as e:  # the store itself may be gone with rank 0
                    msg = f"cannot read the other ranks' heartbeats ({e}); rank 0 (the store host) may be dead"
                self.log(f"[watchdog rank {self.rank}] no training progress for {stalled:.0f}s "
                         f"(train.collective_timeout_s={self.timeout_s:g}) at step {self.step} ({self.phase}); "
                         f"{msg}; ending this rank with exit code {WATCHDOG_EXIT_CODE}")
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(WATCHDOG_EXIT_CODE)

    def _publish_heartbeat_only(self) -> None:
        self._publish()
