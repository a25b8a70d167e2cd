"""Process topology, process-group start-up and the stuck/dead-rank watchdog.

Ranks come from torchrun / the deepspeed launcher (RANK, LOCAL_RANK, WORLD_SIZE) or from Slurm
(SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS). The rendezvous is MASTER_ADDR / MASTER_PORT (under
Slurm MASTER_ADDR defaults to the first host of SLURM_JOB_NODELIST, expanded by notellm2.hostlist).

The watchdog: every rank publishes, in the process group's TCPStore, a heartbeat (wall time,
refreshed by a thread) and the step its training loop has reached. When a rank's own loop makes
no progress for `timeout_s`, its watchdog reads every rank's record, prints which ranks are
behind or silent, and ends the process with exit code 3, so that the launcher tears the job down
instead of hanging. The gloo process-group timeout is set a little longer as a second line.

Every collective the launcher runs goes through the helpers below (`all_reduce`, `all_gather_object`,
`gather_object`, `broadcast_object_list`, `barrier`): NCCL accepts only CUDA tensors, gloo only CPU
ones, so the helpers put a tensor on `collective_device()` (the rank's CUDA device under NCCL, the CPU
under gloo) and copy the result back into the caller's tensor, which keeps its device and dtype.
Without a process group they are what one rank would get (sum of one = itself, a list of one).
`tests/launcher/train/test_collectives.py` fails when a file under `launcher/` calls `torch.distributed`
collectives directly.
"""
from __future__ import annotations

import datetime
import faulthandler
import glob
import json
import os
import re
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from notellm2 import compat

WATCHDOG_EXIT_CODE = 3
ReduceOp = dist.ReduceOp
# Backend name -> the device its collectives take tensors on ("cuda" means this rank's cuda:LOCAL_RANK).
BACKEND_DEVICES = {"gloo": "cpu", "mpi": "cpu", "nccl": "cuda"}
# The local rank whose CUDA device init_distributed bound (None: not started here).
_bound_local_rank: Optional[int] = None


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
    """The head node of a Slurm node list ("rack[3-4]-gpu[01-02],x" -> "rack3-gpu01"), through the one
    host-list parser (notellm2.hostlist, which slurm/rendezvous.sh runs too); None for an empty list."""
    from notellm2.errors import UserError
    from notellm2.hostlist import HostListError, expand

    try:
        hosts = expand(nodelist)
    except HostListError as e:
        raise UserError(f"SLURM_JOB_NODELIST: {e}") from None
    return hosts[0] if hosts else None


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


def enable_crash_traces() -> None:
    """faulthandler on, for every thread, into this rank's stderr: a native crash (SIGSEGV, SIGABRT,
    SIGBUS, SIGFPE, SIGILL) then prints each thread's Python stack into the rank's log before it dies.
    The trainer and `notellm2 embed` call it first thing."""
    faulthandler.enable(file=_stderr_with_fd(), all_threads=True)


def _stderr_with_fd():
    """sys.stderr, or the process's own when it has no file descriptor (pytest, notebooks capture it)."""
    try:
        sys.stderr.fileno()
        return sys.stderr
    except (AttributeError, OSError, ValueError):
        return sys.__stderr__


def _dump_stacks(worker_wait_s: float = 0.5) -> None:
    """Every thread's Python stack into this rank's stderr (the watchdog's last words), then those of
    its forked loader workers (each prints its own on notellm2.data_shards.reader.workers.STACKS_SIGNAL)."""
    stream = _stderr_with_fd()
    try:
        stream.flush()
        faulthandler.dump_traceback(file=stream, all_threads=True)
    except Exception:  # the diagnosis must not stop the exit
        pass
    if signal_forked_workers() and worker_wait_s > 0:
        time.sleep(worker_wait_s)  # let them write before this rank exits (and they with it)


def forked_children() -> list:
    """PIDs of this process's children that run this process's command line: the loader workers it
    forked (a spawned or forkserver worker, the forkserver and resource tracker run other command
    lines). Linux /proc only; [] elsewhere."""
    import glob

    try:
        with open("/proc/self/cmdline", "rb") as fh:
            mine = fh.read()
    except OSError:
        return []
    pids = []
    for path in glob.glob("/proc/self/task/*/children"):
        try:
            with open(path) as fh:
                pids += [int(p) for p in fh.read().split()]
        except OSError:
            continue
    found = []
    for pid in sorted(set(pids)):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if fh.read() == mine:
                    found.append(pid)
        except OSError:
            continue
    return found


def signal_forked_workers() -> list:
    """Ask this rank's forked loader workers for their stacks; returns the PIDs signalled."""
    from notellm2.data_shards.reader.workers import STACKS_SIGNAL

    sent = []
    for pid in forked_children():
        try:
            os.kill(pid, STACKS_SIGNAL)
            sent.append(pid)
        except OSError:
            continue
    return sent


def init_distributed(topo: Topology, timeout_s: float, deepspeed_comm: bool = True) -> str:
    """Start torch.distributed (+ DeepSpeed comm unless `deepspeed_comm=False`); returns the backend name.

    Under NCCL the rank's CUDA device is set (and bound to the group) before the group starts, so that
    object collectives and barriers use cuda:LOCAL_RANK, not cuda:0; nothing may touch CUDA before."""
    global _bound_local_rank
    os.environ.setdefault("RANK", str(topo.rank))
    os.environ.setdefault("LOCAL_RANK", str(topo.local_rank))
    os.environ.setdefault("WORLD_SIZE", str(topo.world_size))
    os.environ.setdefault("MASTER_ADDR", topo.master_addr)
    os.environ.setdefault("MASTER_PORT", str(topo.master_port))
    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    backend = "nccl" if use_cuda else "gloo"
    extra = {}
    if use_cuda:
        torch.cuda.set_device(topo.local_rank)
        extra["device_id"] = torch.device("cuda", topo.local_rank)
    _bound_local_rank = topo.local_rank
    if deepspeed_comm:
        compat.skip_deepspeed_shm_build()  # ~90 s of compiling an inference-only op (FACTS)
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=topo.rank, world_size=topo.world_size,
                                timeout=datetime.timedelta(seconds=timeout_s), **extra)
    if deepspeed_comm:
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return backend


def shutdown(wait_for_ranks: bool = True) -> None:
    """The one teardown of a rank, before its interpreter exits: `notellm2.launcher.cli.main` runs it on every verb's
    way out (exit 0, the preemption's 75, a user error's 2, a crash), the benchmark workers and the test rank
    entry (tests/helpers/rank_entry.py) call it last. Safe to call twice; without a process group it only
    stops watchdogs and waits for gloo workers, if any.

    1. stop this process's watchdog threads (a daemon thread inside a store call when the interpreter
       finalises is killed there, the abort below by another road);
    2. `wait_for_ranks`: a barrier, so that no rank leaves while another still needs it (skip it after an
       error: the other ranks may never get there);
    3. end the process group;
    4. wait until every gloo worker thread of this process is idle (`wait_gloo_workers_idle`).

    Why 4 (issue #24, docs/training.md "Exit aborts"): a gloo worker thread (`pt_gloo_runloop`) drops each
    finished collective *after* the caller was released, and in torch 2.13 dropping a tensor that has a
    Python object takes the GIL (c10::TensorImpl::decref_pyobject). When that request meets the start of
    interpreter finalisation, Python 3.11 ends the thread with pthread_exit; the unwinding crosses a
    noexcept destructor (~AsyncWork) and std::terminate aborts the rank: "terminate called without an active
    exception", after all its work was done. Ending the process group does not stop those threads: the
    groups live on while anything holds them (DeepSpeed keeps references in its ZeRO-3 parameters, module
    globals and caches), so they reach finalisation."""
    for watchdog in list(_watchdogs):
        watchdog.stop()
    if is_distributed():
        if wait_for_ranks:
            barrier()
        dist.destroy_process_group()
    if not wait_gloo_workers_idle():
        print(f"[rank {os.environ.get('RANK', '?')}] gloo worker threads still busy {GLOO_IDLE_TIMEOUT_S:g} s after "
              "the process group ended; the interpreter may abort at exit (launcher/distributed.py: shutdown)",
              file=_stderr_with_fd(), flush=True)


# The name torch gives gloo's worker threads (ProcessGroupGloo::runLoop sets it).
GLOO_WORKER_THREAD = "pt_gloo_runloop"
GLOO_IDLE_TIMEOUT_S = 30.0


def gloo_workers() -> dict:
    """thread id -> (state letter, context switches) of this process's gloo worker threads, from /proc
    ({} where there is none, or no /proc)."""
    out = {}
    for task in glob.glob("/proc/self/task/*"):
        try:
            with open(os.path.join(task, "comm")) as fh:
                if fh.read().strip() != GLOO_WORKER_THREAD:
                    continue
            with open(os.path.join(task, "status")) as fh:
                status = fh.read()
        except OSError:  # the thread ended meanwhile
            continue
        state = re.search(r"^State:\s+(\S)", status, re.M)
        switches = re.findall(r"^(?:non)?voluntary_ctxt_switches:\s+(\d+)", status, re.M)
        out[int(os.path.basename(task))] = (state.group(1) if state else "?", sum(int(n) for n in switches))
    return out


def wait_gloo_workers_idle(timeout_s: float = GLOO_IDLE_TIMEOUT_S, interval_s: float = 0.005) -> bool:
    """Wait until no gloo worker thread of this process is still finishing a collective; False on timeout.

    Idle means: every worker was asleep ("S") at the start and at the end of an interval in which this
    thread slept with the GIL released, and none was switched in or out meanwhile (same context-switch
    count). A worker still dropping a finished collective cannot pass that: with the GIL free it runs (its
    state is "R", or its switch count moves, when it takes the GIL), and a worker that waits for a lock held
    by such a worker wakes as soon as that one is done. An idle worker sleeps on its empty queue and is never
    woken, since this process runs no more collectives. Nothing to wait for without gloo workers."""
    deadline = time.monotonic() + timeout_s
    before = gloo_workers()
    while before:
        time.sleep(interval_s)  # the GIL is free meanwhile: a worker that needs it for a drop gets it now
        after = gloo_workers()
        if after == before and all(state == "S" for state, _ in after.values()):
            return True
        if time.monotonic() > deadline:
            return False
        before = after
    return True


# ----------------------------------------------------------------------------- device-aware collectives

def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def collective_device(backend: Optional[str] = None, local_rank: Optional[int] = None) -> torch.device:
    """The device a collective of `backend` takes tensors on: "gloo"/"mpi" -> cpu, "nccl" ->
    cuda:local_rank; a per-device spec such as "cpu:gloo,cuda:nccl" -> cpu (the values the launcher
    reduces live on the host, and torch's object collectives make the same choice).

    Defaults: `backend` is the running group's (gloo when none runs), `local_rank` the one
    init_distributed bound (else LOCAL_RANK / SLURM_LOCALID). With both given it is a pure function."""
    if backend is None:
        backend = dist.get_backend() if is_distributed() else "gloo"
    name = str(backend).strip().lower()
    if ":" in name:  # "cpu:gloo,cuda:nccl": device type -> backend
        pairs = [part.split(":", 1) for part in name.split(",") if part.strip()]
        if not all(len(p) == 2 and p[0].strip() in ("cpu", "cuda") and p[1].strip() in BACKEND_DEVICES
                   and BACKEND_DEVICES[p[1].strip()] == p[0].strip() for p in pairs) or not pairs:
            raise ValueError(f"collective backend {backend!r}: expected 'device:backend' pairs such as "
                             f"'cpu:gloo,cuda:nccl' (backends: {', '.join(BACKEND_DEVICES)})")
        kind = "cpu" if any(p[0].strip() == "cpu" for p in pairs) else "cuda"
    elif name in BACKEND_DEVICES:
        kind = BACKEND_DEVICES[name]
    else:
        raise ValueError(f"collective backend {backend!r}: unknown; allowed {', '.join(BACKEND_DEVICES)} "
                         "or a 'cpu:gloo,cuda:nccl' spec")
    if kind == "cpu":
        return torch.device("cpu")
    if local_rank is None:
        local_rank = _bound_local_rank if _bound_local_rank is not None else detect_topology().local_rank
    return torch.device("cuda", int(local_rank))


def _device_checked() -> torch.device:
    """collective_device(), and under NCCL a check that the current CUDA device is that rank's one
    (object collectives and barriers use the current device)."""
    device = collective_device()
    if device.type == "cuda" and torch.cuda.current_device() != device.index:
        raise RuntimeError(f"the current CUDA device is cuda:{torch.cuda.current_device()} but this rank's is "
                           f"{device}: start the process group with notellm2.launcher.distributed.init_distributed "
                           "(it calls torch.cuda.set_device(local_rank) first)")
    return device


def all_reduce(tensor: torch.Tensor, op=ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce of `tensor` (any device, dtype kept) through the backend's device; returns it."""
    if not is_distributed():
        return tensor
    device = _device_checked()
    work = tensor if tensor.device == device else tensor.to(device)
    dist.all_reduce(work, op=op)
    if work is not tensor:
        tensor.copy_(work)  # a device -> host copy: synchronous
    return tensor


def all_gather_object(obj) -> list:
    """Every rank's `obj` (picklable), in rank order."""
    if not is_distributed():
        return [obj]
    _device_checked()
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_object(obj, dst: int = 0) -> Optional[list]:
    """Every rank's `obj` in rank order on rank `dst`; None on the other ranks."""
    if not is_distributed():
        return [obj]
    _device_checked()
    rank = dist.get_rank()
    out = [None] * dist.get_world_size() if rank == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def broadcast_object_list(objects: list, src: int = 0) -> list:
    """`objects` (a list, filled in place on the other ranks) as rank `src` holds it; returns it."""
    if not is_distributed():
        return objects
    _device_checked()
    dist.broadcast_object_list(objects, src=src)
    return objects


def barrier() -> None:
    """Wait for every rank; under NCCL on this rank's device (no guess from the global rank)."""
    if not is_distributed():
        return
    device = _device_checked()
    if device.type == "cuda":
        dist.barrier(device_ids=[device.index])
    else:
        dist.barrier()


def default_store():
    return compat.default_store()


# Watchdogs whose thread runs; shutdown() stops any still running (a daemon thread must not be inside a
# store call when the interpreter finalises).
_watchdogs: "weakref.WeakSet[Watchdog]" = weakref.WeakSet()


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
        _watchdogs.add(self)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        _watchdogs.discard(self)

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
                         f"{msg}; ending this rank with exit code {WATCHDOG_EXIT_CODE}; its threads' stacks, and its "
                         f"loader workers', follow on stderr")
                sys.stdout.flush()
                _dump_stacks()  # where this rank's main thread waits: which collective, called from where
                sys.stderr.flush()
                os._exit(WATCHDOG_EXIT_CODE)

    def _publish_heartbeat_only(self) -> None:
        self._publish()


PEER_ERROR_MARKERS = ("connection closed by peer", "connection reset by peer", "read error", "timed out",
                      "broken pipe", "nccl", "socket", "distbackenderror")


def is_peer_error(e: BaseException) -> bool:
    """A collective that failed because another rank died or hung (not this rank's own fault)."""
    text = f"{type(e).__name__}: {e}".lower()
    return isinstance(e, RuntimeError) and any(m in text for m in PEER_ERROR_MARKERS)
