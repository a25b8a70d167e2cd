#!/usr/bin/env python
"""Soak the trainer for native crashes (heap corruption, segfaults) on 2 CPU ranks.

Two modes, each run under glibc's heap checks (`LD_PRELOAD=libc_malloc_debug.so.0 MALLOC_CHECK_=3`,
`MALLOC_PERTURB_`), with the tiny models and shards of the tests (nothing downloaded):

* `--mode plain --steps N`: one run of N steps per configuration (the tiny data has 16 steps per
  epoch, so every 16 steps the loader restarts its workers and allocates new pixel slots);
* `--mode collectives --iters N --configs blocking,functional`: the gathered loss's collectives alone
  (scripts/soak_collectives.py: no model, no DeepSpeed, no loader), N iterations per run, with the
  loss's blocking gather or torch's functional collectives (what it used before; they corrupted the
  heap here, docs/training.md "Native crashes");
* `--mode resume --cycles N`: N cycles per configuration of "train a few steps, then stop": SIGUSR1
  to one rank (every rank checkpoints and exits 75, the requeue path) or kill -9 of the whole job
  (resume from the last complete checkpoint), alternating, each followed by a resume;
* `--mode exit --runs N --kinds bench,train,embed`: N short 2-rank runs that finish normally, taken in
  turn from the kinds (the lean `benchmarks/bench_chunked.py` worker of its test, cycling its four
  configurations; a 2-step tiny `launcher train`; a tiny `launcher embed`), without heap checks (the
  conditions of the failing test). A run counts as an abort when its work was done (the benchmark's
  result file, the trainer's "done:" line, embeddings.npy) and it still ended with a non-zero exit
  code, a signal or abort output ("terminate called", "Fatal Python error"); a run that fails before
  its work is done counts apart. With `--cores N` the ranks may dump core (each run in a folder of its
  own, where the core lands): the first N aborted runs keep theirs, for `gdb -batch -ex 'thread apply
  all bt' PYTHON CORE`. Stops early after `--max-aborts`. `--switch-interval S` runs every process of the
  soak with `sys.setswitchinterval(S)` (a sitecustomize on PYTHONPATH): a thread that waits for the GIL waits
  up to S instead of 5 ms, which widens the race at exit (docs/training.md "Exit aborts") without touching
  the code under test, as MALLOC_PERTURB_ does for heap bugs. `--ledger FILE` appends one JSON line per
  run (time, commit, digest of the teardown's code, kind, status, load average) and ends with the
  ledger's totals for today's teardown digest, so a soak of 500 runs may be spread over several
  sittings of the same code and still be counted as one (runs of another digest are listed apart).

A crash is a rank killed by a signal, or glibc/faulthandler output in the log (`malloc(): ...`,
`free(): ...`, `corrupted ...`, `Fatal Python error`, ...). Configurations (`--configs`, comma
separated) flip one suspect at a time, to bisect: see CONFIGS. Prints one line per run and, at the
end, the crash count per configuration, then a `RESULT {json}` line. Logs of crashed runs are kept
under --work/logs.

    .venv/bin/python scripts/soak.py --mode plain --steps 2000 --configs default
    .venv/bin/python scripts/soak.py --mode resume --cycles 50 --configs default,no-slots
    .venv/bin/python scripts/soak.py --mode exit --runs 300 --max-aborts 5 --cores 3
    .venv/bin/python scripts/soak.py --mode exit --runs 510 --cores 3 --ledger /work/exp/soak/exit_ledger.jsonl
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# name -> (config overrides, extra environment): one suspect flipped at a time
CONFIGS = {
    "default": ([], {}),
    "no-slots": (["data.pixel_slots=false"], {}),
    "workers0": (["data.num_workers=0"], {}),
    "workers2": (["data.num_workers=2"], {}),
    "forkserver": (["data.worker_start_method=forkserver"], {}),
    "spawn": (["data.worker_start_method=spawn"], {}),
}
GATHERS = ("blocking", "functional", "functional-nograd", "functional-wait")  # --mode collectives
CRASH_PATTERNS = re.compile(r"malloc\(\)|free\(\)|corrupted|double free|tcache|Fatal Python error|"
                            r"Segmentation fault|SIGSEGV|SIGABRT|Signal 11|Signal 6|signal: Aborted|"
                            r"killed by signal|munmap_chunk|realloc\(\)")
MALLOC_DEBUG = "/lib/x86_64-linux-gnu/libc_malloc_debug.so.0"


def malloc_env(perturb: int) -> dict:
    env = {"MALLOC_PERTURB_": str(perturb)}
    if os.path.exists(MALLOC_DEBUG):
        env.update(LD_PRELOAD=MALLOC_DEBUG, MALLOC_CHECK_="3")
    return env


def build_inputs(root: str) -> list[str]:
    """Tiny Llama + tiny CLIP + synthetic shards (as the Slurm tests use), built once per --work."""
    from tests.helpers.real_inputs import cached_tiny_cpu_overrides

    return cached_tiny_cpu_overrides(root)


def steps_done(run_dir: str) -> int:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    last = 0
    with open(path) as fh:
        for line in fh:
            try:
                last = json.loads(line)["step"]
            except (ValueError, KeyError):
                pass
    return last


class Runner:
    def __init__(self, work: str, inputs: list[str], perturb: int, timeout_s: float):
        self.work, self.inputs, self.perturb, self.timeout_s = work, inputs, perturb, timeout_s
        self.logs = os.path.join(work, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.n = 0

    def start(self, config: str, run_dir: str, overrides: list[str], program: Optional[list] = None):
        extra_over, extra_env = CONFIGS.get(config, ([], {}))
        self.n += 1
        log_path = os.path.join(self.logs, f"{config}-{self.n:04d}.log")
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false", PYTHONFAULTHANDLER="1", PYTHONWARNINGS="ignore",
                   **malloc_env(self.perturb), **extra_env)
        if program is None:
            program = ["-m", "notellm2.launcher", "train", "--config", os.path.join(REPO, "configs", "tiny_cpu.yaml"),
                       *self.inputs, f"train.output_dir={run_dir}", *extra_over, *overrides]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *program]
        fh = open(log_path, "w")
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        return proc, fh, log_path

    def finish(self, proc, fh, log_path: str, deadline: float) -> tuple[int, str]:
        try:
            rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)  # torchrun's ranks run in sessions of their own: its process group misses them
            rc = proc.wait()
            fh.close()
            return -999, "timeout"
        fh.close()
        text = open(log_path, errors="replace").read()
        m = CRASH_PATTERNS.search(text)
        return rc, (m.group(0) if m else "")


def rank_pids(root_pid: int) -> list[int]:
    """The trainer processes (children of torchrun) in torchrun's session."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read().split(b"\0")
        except OSError:
            continue
        if int(fields[1]) == root_pid and b"launcher" in cmd:  # ppid == torchrun
            out.append(int(pid))
    return sorted(out)


def run_plain(runner: Runner, config: str, steps: int) -> dict:
    run_dir = os.path.join(runner.work, f"plain-{config}")
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.monotonic()
    proc, fh, log = runner.start(config, run_dir, [f"train.max_steps={steps}", f"checkpoint.every_steps={max(steps // 4, 1)}",
                                                   "logging.log_every_steps=100"])
    rc, hit = runner.finish(proc, fh, log, time.monotonic() + runner.timeout_s + steps * 3)
    done = steps_done(run_dir)
    return _report(f"plain {config}: rc={rc} steps={done}/{steps}", rc != 0 or bool(hit), hit, rc, log, t0, done)


def run_collectives(runner: Runner, gather: str, iters: int) -> dict:
    t0 = time.monotonic()
    proc, fh, log = runner.start(gather, "", [], program=[os.path.join(REPO, "scripts", "soak_collectives.py"),
                                                          "--gather", gather, "--iters", str(iters)])
    rc, hit = runner.finish(proc, fh, log, time.monotonic() + runner.timeout_s + iters * 0.1)
    text = open(log, errors="replace").read()
    done = [int(x) for x in re.findall(r"(\d+)/\d+ iterations", text)]
    reached = iters if "done" in text and rc == 0 else (max(done) if done else 0)
    return _report(f"collectives {gather}: rc={rc} iterations={reached}/{iters}", rc != 0 or bool(hit), hit, rc, log,
                   t0, reached)


def _report(what: str, crashed: bool, hit: str, rc: int, log: str, t0: float, done: int) -> dict:
    """One line per run; the log of a crashed run is kept, the others are removed."""
    print(f"[soak] {what} {time.monotonic() - t0:.0f}s" + (f" CRASH ({hit or 'exit ' + str(rc)}), log {log}"
                                                         if crashed else ""), flush=True)
    if not crashed:
        os.remove(log)
    return {"runs": 1, "steps": done, "crashes": int(crashed)}


def _reap_orphans(run_dir: str) -> None:
    """No rank of this run may outlive its cycle (it would write checkpoints under the next one)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read()
        except OSError:
            continue
        if b"launcher" in cmd and f"train.output_dir={run_dir}".encode() in cmd:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass


def _stopped_as_expected(how: str, rc: int, log_path: str) -> bool:
    """After kill -9 torchrun itself is gone (-9). After SIGUSR1 to one rank every rank must checkpoint
    and exit 75; torchrun then exits 1 and lists each failed rank's exit code. It SIGTERMs the ranks
    still running as soon as the first one exits, so a rank that was past the checkpoint but not yet out
    shows -15: that is torchrun's teardown, not a crash (the checkpoint is complete, the save ends in a
    barrier). Plain rank processes (tests/launcher/train/test_preempt_one_rank.py) show every rank's 75."""
    if how == "kill9":
        return rc in (-9, 0)
    if rc == 0:
        return True  # the run reached max_steps before the signal
    text = open(log_path, errors="replace").read()
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", text)
    return (rc == 1 and "75" in codes and set(codes) <= {"75", "-15"}
            and "exiting with code 75" in text and not CRASH_PATTERNS.search(text))


def run_resume(runner: Runner, config: str, cycles: int, steps_per_cycle: int) -> dict:
    run_dir = os.path.join(runner.work, f"resume-{config}")
    shutil.rmtree(run_dir, ignore_errors=True)
    total = cycles * (steps_per_cycle + 2) + 4  # a SIGUSR1 stop lands a step or two after the signal
    counts = {"runs": 0, "steps": 0, "crashes": 0, "cycles": 0}
    for c in range(cycles):
        before = steps_done(run_dir)
        proc, fh, log = runner.start(config, run_dir, [f"train.max_steps={total}", "checkpoint.every_steps=2",
                                                       "logging.log_every_steps=1000"])
        how = "usr1" if c % 2 == 0 else "kill9"
        deadline = time.monotonic() + runner.timeout_s
        target = before + steps_per_cycle
        while steps_done(run_dir) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if proc.poll() is None:
            if how == "usr1":
                pids = rank_pids(proc.pid)
                if pids:
                    os.kill(pids[-1], signal.SIGUSR1)  # one rank only: every rank must stop at the same step
            else:
                # torchrun starts each rank in a session of its own: kill the ranks, not just torchrun
                for pid in rank_pids(proc.pid):
                    os.kill(pid, signal.SIGKILL)
                os.killpg(proc.pid, signal.SIGKILL)
        rc, hit = runner.finish(proc, fh, log, time.monotonic() + 120)
        _reap_orphans(run_dir)
        crashed = bool(hit) or not _stopped_as_expected(how, rc, log)
        counts["runs"] += 1
        counts["cycles"] += 1
        counts["steps"] = steps_done(run_dir)
        counts["crashes"] += int(crashed)
        print(f"[soak] resume {config} cycle {c + 1}/{cycles} ({how}): rc={rc} step {before}->{counts['steps']}"
              + (f" CRASH ({hit or 'exit ' + str(rc)}), log {log}" if crashed else ""), flush=True)
        if not crashed:
            os.remove(log)
    return counts


# ----------------------------------------------------------------------------- --mode exit

EXIT_KINDS = ("bench", "train", "embed")
# What a rank that dies at interpreter exit leaves in the log: libstdc++'s std::terminate message,
# faulthandler's header, or torchrun's account of a rank ended by a signal (a negative exit code).
ABORT_PATTERNS = re.compile(r"terminate called|Fatal Python error|Segmentation fault|core dumped|"
                            r"exitcode\s*:\s*-\d+|Signal \d+ \(SIG")
BENCH_CONFIGS = ((2, 0), (2, 2), (4, 0), (4, 2))  # tests/e2e/test_training_benchmarks.py: --pairs 2 4 --chunk 2


class ExitSoak:
    """Short 2-rank runs that finish normally, one kind after another; see the module docstring."""

    def __init__(self, work: str, timeout_s: float, cores: int, switch_interval: float = 0.0):
        self.work, self.timeout_s, self.cores_left = work, timeout_s, cores
        self.pythonpath = REPO
        if switch_interval:
            amplify = os.path.join(work, "switch-interval")
            os.makedirs(amplify, exist_ok=True)
            with open(os.path.join(amplify, "sitecustomize.py"), "w") as fh:
                fh.write(f"import sys\nsys.setswitchinterval({switch_interval!r})  # scripts/soak.py --switch-interval\n")
            self.pythonpath = amplify + os.pathsep + REPO
        self.runs_dir = os.path.join(work, "exit-runs")
        shutil.rmtree(self.runs_dir, ignore_errors=True)
        os.makedirs(self.runs_dir)
        self.n = 0
        self.inputs: dict = {}
        self.bench_turn = itertools.cycle(BENCH_CONFIGS)

    def prepare(self, kinds: list[str]) -> None:
        """Inputs of every kind, built once per --work and reused by later soaks."""
        from pathlib import Path

        if "bench" in kinds:
            from tests.helpers.paths import pretrained_model

            sys.path.insert(0, os.path.join(REPO, "benchmarks"))
            from bench_train_step import make_shards

            data = os.path.join(self.work, "exit-inputs", "bench")
            done = os.path.join(data, "pattern.txt")
            if not os.path.exists(done):
                shutil.rmtree(data, ignore_errors=True)
                pattern = make_shards(os.path.join(data, "shards"), n_pairs=256, shard_size=64)  # bench_chunked's own
                with open(done, "w") as fh:
                    fh.write(pattern)
            self.inputs["bench"] = {"shards": open(done).read().strip(), "llm": pretrained_model("smollm2-135m")}
        if "train" in kinds:
            self.inputs["train"] = build_inputs(self.work)
        if "embed" in kinds:
            from tests.helpers.embed_setup import tiny_embed_setup

            root = os.path.join(self.work, "exit-inputs", "embed")
            done = os.path.join(root, "setup.json")
            if not os.path.exists(done):
                shutil.rmtree(root, ignore_errors=True)
                os.makedirs(root)
                setup = tiny_embed_setup(Path(root))
                with open(done, "w") as fh:
                    json.dump({"config": setup["config"]}, fh)
            self.inputs["embed"] = json.load(open(done))

    def _program(self, kind: str, run_dir: str) -> tuple[list[str], str, str]:
        """(what follows `torchrun ...`, a description, what says the work is done: a file that exists, or
        for the trainer its last log line)."""
        if kind == "bench":
            pairs, chunk = next(self.bench_turn)
            result = os.path.join(run_dir, "result.json")
            ins = self.inputs["bench"]
            overrides = [f"model.llm.path={ins['llm']}", f"data.train_shards={ins['shards']}", "data.val_shards=",
                         "data.notes_shards=",
                         f"train.output_dir={os.path.join(run_dir, 'run')}", "train.max_steps=2",
                         "checkpoint.every_steps=100000", "checkpoint.resume=none", "train.warmup_steps=1",
                         "logging.tensorboard=false", f"data.pairs_per_rank={pairs}", f"train.chunk_pairs={chunk}",
                         "eval.every_steps=0"]
            return ([os.path.join(REPO, "benchmarks", "bench_chunked.py"), "--worker", "--config",
                     os.path.join(REPO, "configs", "demo_cpu.yaml"), "--overrides", json.dumps(overrides),
                     "--result", result], f"P={pairs} chunk={chunk}", result)
        if kind == "train":
            out = os.path.join(run_dir, "run")
            return (["-m", "notellm2.launcher", "train", "--config", os.path.join(REPO, "configs", "tiny_cpu.yaml"),
                     *self.inputs["train"], f"train.output_dir={out}", "train.max_steps=2",
                     "checkpoint.every_steps=100000", "logging.tensorboard=false"],
                    "2 steps", "done: step 2 of 2 ")
        out = os.path.join(run_dir, "emb")
        return (["-m", "notellm2.launcher", "embed", "--config", self.inputs["embed"]["config"], "--out", out,
                 "--batch-size", "4"], "tiny", os.path.join(out, "embeddings.npy"))

    def run(self, kind: str) -> dict:
        self.n += 1
        run_dir = os.path.join(self.runs_dir, f"{self.n:04d}-{kind}")
        os.makedirs(run_dir)
        program, what, done_path = self._program(kind, run_dir)
        log_path = os.path.join(run_dir, "torchrun.log")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *program]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=self.pythonpath, HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
        keep_core = self.cores_left > 0

        def allow_core():  # in the child, before exec: its ranks inherit the limit
            import resource

            resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY) if keep_core
                               else (0, 0))

        t0 = time.monotonic()
        with open(log_path, "w") as fh:
            # cwd = the run's folder: a rank's core file ("core", kernel.core_pattern here) lands there
            proc = subprocess.Popen(cmd, cwd=run_dir, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True, preexec_fn=allow_core)
            try:
                rc = proc.wait(timeout=self.timeout_s)
            except subprocess.TimeoutExpired:
                kill_tree(proc.pid)
                rc = -999
        text = open(log_path, errors="replace").read()
        work_done = done_path in text if kind == "train" else os.path.exists(done_path)
        hits = sorted(set(ABORT_PATTERNS.findall(text)))
        if rc == -999:
            status = "timeout"
        elif not work_done:
            status = "failed"  # before its work was done: not the exit abort, but never quietly a pass
        elif rc != 0 or hits:
            status = "abort"
        else:
            status = "ok"
        codes = re.findall(r"rank\s*:\s*(\d+) \(local_rank[^\n]*\n\s*exitcode\s*:\s*(-?\d+)", text)
        core = os.path.join(run_dir, "core")
        line = (f"[soak] exit {self.n:4d} {kind:5s} {what:14s} rc={rc} {status.upper() if status != 'ok' else 'ok'} "
                f"{time.monotonic() - t0:.0f}s")
        if status != "ok":
            line += (f" ({'; '.join(hits) if hits else 'exit ' + str(rc)}; torchrun's ranks: "
                     f"{', '.join(f'{r}->{c}' for r, c in codes) or '?'}) log {log_path}")
            if os.path.exists(core):
                self.cores_left -= 1
                line += f", core {core}"
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
        print(line, flush=True)
        return {"kind": kind, "status": status, "rc": rc, "wall_s": round(time.monotonic() - t0, 1)}


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every descendant (torchrun starts each rank in a session of its own)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


TEARDOWN_CODE = ("launcher/distributed.py", "launcher/cli/__init__.py")  # notellm2.launcher.distributed, .cli
STATUS_KEY = {"ok": "ok", "abort": "aborts", "failed": "failed", "timeout": "timeouts"}


def teardown_digest() -> str:
    """A digest of the code that ends a rank (`shutdown()` and the CLI's `finally` that calls it): the
    ledger counts runs of one digest together."""
    import hashlib

    h = hashlib.sha256()
    for rel in TEARDOWN_CODE:
        with open(os.path.join(REPO, rel), "rb") as fh:
            h.update(rel.encode() + b"\0" + fh.read())
    return h.hexdigest()[:16]


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=30).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def ledger_totals(path: str, digest: str) -> dict:
    """The ledger's runs of `digest` per status, and how many lines belong to other digests."""
    totals = {"runs": 0, "ok": 0, "aborts": 0, "failed": 0, "timeouts": 0, "sittings": 0, "other_digests": 0}
    sittings = set()
    with open(path) as fh:
        for n, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
                status = STATUS_KEY[rec["status"]]
            except (ValueError, KeyError, TypeError) as e:
                raise SystemExit(f"soak.py: error: {path}: line {n} is not a ledger record ({e})") from None
            if rec.get("teardown") != digest:
                totals["other_digests"] += 1
                continue
            totals["runs"] += 1
            totals[status] += 1
            sittings.add(rec.get("sitting"))
    totals["sittings"] = len(sittings)
    return totals


def run_exit(work: str, kinds: list[str], runs: int, max_aborts: int, timeout_s: float, cores: int,
             switch_interval: float, ledger: Optional[str], digest: str) -> dict:
    soak = ExitSoak(work, timeout_s, cores, switch_interval)
    soak.prepare(kinds)
    per_kind = {k: {"runs": 0, "ok": 0, "aborts": 0, "failed": 0, "timeouts": 0} for k in kinds}
    stamp = {"commit": git_commit(), "teardown": digest, "sitting": time.strftime("%Y%m%dT%H%M%S"),
             "switch_interval": switch_interval or None}
    aborts = 0
    for kind in itertools.islice(itertools.cycle(kinds), runs):
        r = soak.run(kind)
        c = per_kind[kind]
        c["runs"] += 1
        c[STATUS_KEY[r["status"]]] += 1
        aborts += r["status"] == "abort"
        if ledger:
            rec = {"t": time.strftime("%Y-%m-%dT%H:%M:%S"), **stamp, **r, "load1": round(os.getloadavg()[0], 2)}
            with open(ledger, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
        if max_aborts and aborts >= max_aborts:
            print(f"[soak] {aborts} aborts: stopping (--max-aborts {max_aborts})", flush=True)
            break
    return per_kind


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("plain", "resume", "collectives", "exit"), default="plain")
    ap.add_argument("--kinds", default=",".join(EXIT_KINDS), help=f"exit mode: from {list(EXIT_KINDS)}, taken in turn")
    ap.add_argument("--max-aborts", type=int, default=0, help="exit mode: stop after this many aborts (0: never)")
    ap.add_argument("--cores", type=int, default=0, help="exit mode: keep the core files of the first N aborted runs")
    ap.add_argument("--switch-interval", type=float, default=0.0,
                    help="exit mode: sys.setswitchinterval for every process of the runs (0: Python's 5 ms)")
    ap.add_argument("--configs", default=None, help=f"comma separated, from {sorted(CONFIGS)} (collectives mode: "
                    f"from {list(GATHERS)}; default blocking)")
    ap.add_argument("--iters", type=int, default=20000, help="collectives mode: iterations per run")
    ap.add_argument("--steps", type=int, default=2000, help="plain mode: steps per run")
    ap.add_argument("--runs", type=int, default=1, help="plain mode: runs per configuration; exit mode: runs in all")
    ap.add_argument("--cycles", type=int, default=50, help="resume mode: stop/resume cycles per configuration")
    ap.add_argument("--steps-per-cycle", type=int, default=6)
    ap.add_argument("--perturb", type=int, default=165, help="MALLOC_PERTURB_ byte")
    ap.add_argument("--timeout-s", type=float, default=300.0, help="per run, on top of the steps' own budget")
    ap.add_argument("--work", default=os.path.join(REPO, "artifacts", "soak"))
    ap.add_argument("--ledger", default=None, help="exit mode: append a JSON line per run here and print the totals "
                    "of every run of today's teardown code in it")
    args = ap.parse_args(argv)
    if args.mode == "exit":
        return main_exit(ap, args)
    allowed = GATHERS if args.mode == "collectives" else tuple(CONFIGS)
    configs = [c for c in (args.configs or ("blocking" if args.mode == "collectives" else "default")).split(",") if c]
    unknown = [c for c in configs if c not in allowed]
    if unknown:
        ap.error(f"--configs: unknown {unknown}; allowed in --mode {args.mode}: {list(allowed)}")
    os.makedirs(args.work, exist_ok=True)
    inputs = [] if args.mode == "collectives" else build_inputs(args.work)
    runner = Runner(args.work, inputs, args.perturb, args.timeout_s)
    results = {}
    t0 = time.monotonic()
    for config in configs:
        if args.mode in ("plain", "collectives"):
            agg = {"runs": 0, "steps": 0, "crashes": 0}
            for _ in range(args.runs):
                r = (run_plain(runner, config, args.steps) if args.mode == "plain"
                     else run_collectives(runner, config, args.iters))
                for k in agg:
                    agg[k] += r[k]
            results[config] = agg
        else:
            results[config] = run_resume(runner, config, args.cycles, args.steps_per_cycle)
    print("[soak] crashes per configuration:")
    for config, r in results.items():
        unit = "iterations" if args.mode == "collectives" else "steps"
        print(f"  {config:17s} {r['crashes']} crash(es) in {r['runs']} run(s), {r['steps']} {unit}"
              + (f", {r['cycles']} resume cycles" if "cycles" in r else ""))
    total = sum(r["crashes"] for r in results.values())
    print("RESULT " + json.dumps({"name": f"soak_{args.mode}", "figure": total, "bound": 0, "target": "0 crashes",
                                  "ratio": None, "per_config": results, "malloc_checks": os.path.exists(MALLOC_DEBUG),
                                  "wall_s": round(time.monotonic() - t0, 1)}))
    return 0 if total == 0 else 1


def main_exit(ap: argparse.ArgumentParser, args) -> int:
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = [k for k in kinds if k not in EXIT_KINDS]
    if unknown or not kinds:
        ap.error(f"--kinds: unknown {unknown}; allowed: {list(EXIT_KINDS)}")
    args.work = os.path.abspath(args.work)  # the runs start in folders of their own
    os.makedirs(args.work, exist_ok=True)
    t0 = time.monotonic()
    ledger = os.path.abspath(args.ledger) if args.ledger else None
    digest = teardown_digest()  # read once: the runs this sitting counts are of the code as it was at its start
    if ledger:
        os.makedirs(os.path.dirname(ledger), exist_ok=True)
        if os.path.exists(ledger):
            ledger_totals(ledger, digest)  # a damaged ledger is refused before hours of runs
    per_kind = run_exit(args.work, kinds, args.runs, args.max_aborts, args.timeout_s, args.cores, args.switch_interval,
                        ledger, digest)
    print("[soak] exit aborts per kind:")
    for kind, c in per_kind.items():
        print(f"  {kind:6s} {c['aborts']} abort(s) in {c['runs']} run(s) ({c['failed']} failed before their work was "
              f"done, {c['timeouts']} timed out)")
    aborts = sum(c["aborts"] for c in per_kind.values())
    bad = sum(c["aborts"] + c["failed"] + c["timeouts"] for c in per_kind.values())
    totals = None
    if ledger:
        totals = ledger_totals(ledger, digest)
        print(f"[soak] ledger {ledger}, teardown {digest}: {totals['aborts']} abort(s) in {totals['runs']} "
              f"run(s) over {totals['sittings']} sitting(s) ({totals['failed']} failed before their work was done, "
              f"{totals['timeouts']} timed out; {totals['other_digests']} run(s) of other teardown code not counted)")
    print("RESULT " + json.dumps({"name": "soak_exit", "figure": aborts, "bound": 0, "target": "0 aborts",
                                  "ratio": None, "runs": sum(c["runs"] for c in per_kind.values()),
                                  "not_ok": bad, "per_kind": per_kind, "switch_interval": args.switch_interval or None,
                                  "ledger": totals, "wall_s": round(time.monotonic() - t0, 1)}))
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
