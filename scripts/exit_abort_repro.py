#!/usr/bin/env python
"""The exit abort of issue #24 in a few lines, without the trainer: 2 gloo ranks, one all_gather of many small
tensors, then the interpreter exits. A gloo worker thread is still dropping the gather's tensors (in torch 2.13
each drop takes the GIL) when the interpreter starts to finalise; Python ends that thread (pthread_exit), the
unwinding crosses a noexcept C++ destructor and the rank dies: "terminate called without an active exception",
"Fatal Python error: Aborted". With `notellm2.launcher.distributed.shutdown()` as the last call (the fix) it does not.

    .venv/bin/python scripts/exit_abort_repro.py --runs 12            # both variants, 12 runs each
    .venv/bin/python scripts/exit_abort_repro.py --runs 12 --cores    # keep a core of the first abort

Prints one line per run, the abort count per variant and one `RESULT {json}` line. Under torchrun (RANK set)
this file is the rank program itself.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("bare", "shutdown")


def rank_program(variant: str) -> None:
    import faulthandler

    import torch
    import torch.distributed as dist

    faulthandler.enable(all_threads=True)
    dist.init_process_group("gloo")
    big = list(range(3_000_000))
    ins = [torch.ones(4) for _ in range(3000)]
    outs = [[torch.empty(4) for _ in range(3000)] for _ in range(dist.get_world_size())]
    dist.all_gather_coalesced(outs, ins)  # its worker thread drops the 9,000 tensors afterwards, a GIL round trip each
    del ins, outs
    sorted(big, reverse=True)  # the main thread keeps the GIL a while (C code), then the interpreter exits
    if variant == "shutdown":
        sys.path.insert(0, REPO)
        from notellm2.launcher.distributed import shutdown

        shutdown()


def main() -> int:
    if "RANK" in os.environ:
        import warnings

        warnings.simplefilter("ignore")
        rank_program(sys.argv[1])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=12, help="runs per variant")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--cores", action="store_true", help="let the ranks dump core; keep the first aborted run's folder")
    args = ap.parse_args()
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    counts = {}
    for variant in args.variants.split(","):
        counts[variant] = {"runs": 0, "aborts": 0}
        for i in range(args.runs):
            run_dir = tempfile.mkdtemp(prefix=f"exit-repro-{variant}-")
            log = os.path.join(run_dir, "torchrun.log")
            limit = (resource.RLIM_INFINITY,) * 2 if args.cores else (0, 0)
            t0 = time.monotonic()
            with open(log, "w") as fh:
                rc = subprocess.call([torchrun, "--standalone", "--nproc-per-node", "2", os.path.abspath(__file__), variant],
                                     cwd=run_dir, stdout=fh, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                                     preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_CORE, limit))
            text = open(log, errors="replace").read()
            aborted = "terminate called" in text or "Fatal Python error" in text
            counts[variant]["runs"] += 1
            counts[variant]["aborts"] += int(aborted)
            print(f"[repro] {variant:8s} {i + 1:3d}: rc={rc} {'ABORT, log ' + log if aborted else 'ok'} "
                  f"({time.monotonic() - t0:.0f}s)", flush=True)
            if not aborted:
                subprocess.call(["rm", "-rf", run_dir])
            elif counts[variant]["aborts"] > 1:  # keep the log of every abort, a core of the first only
                subprocess.call(["rm", "-f", os.path.join(run_dir, "core")])
    for variant, c in counts.items():
        print(f"  {variant:8s} {c['aborts']} abort(s) in {c['runs']} runs")
    print("RESULT " + json.dumps({"name": "exit_abort_repro", "figure": counts.get("shutdown", {}).get("aborts"),
                                  "bound": 0, "baseline": counts.get("bare", {}).get("aborts"), "ratio": None,
                                  "target": "0 aborts with shutdown()", "per_variant": counts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
