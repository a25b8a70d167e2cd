#!/usr/bin/env python
"""The cost of the in-training retrieval evaluation, from a run's metrics.jsonl.

    python scripts/eval_cost.py RUN_DIR [--every 40] [--steps 120]

Reads perf/eval_s of each evaluation and the mean step time of the steps without one, and prints the
share of training time the evaluations would take in a run of --steps steps evaluated every --every
steps: the first evaluation (which also runs the frozen tower, notellm2.launcher.train.validation.TowerMemo) once,
the mean of the later ones for the rest. One `RESULT {json}` line at the end."""
from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--every", type=int, default=40)
    ap.add_argument("--steps", type=int, default=120)
    args = ap.parse_args(argv)
    rows = [json.loads(line) for line in open(os.path.join(args.run_dir, "metrics.jsonl"))]
    evals = [r["perf/eval_s"] for r in rows if "perf/eval_s" in r]
    steps = [r["perf/step_time_s"] for r in rows if "perf/eval_s" not in r and r["step"] > 1]
    if not evals or not steps:
        raise SystemExit(f"{args.run_dir}: no evaluation or no plain step in metrics.jsonl")
    step = sum(steps) / len(steps)
    first, later = evals[0], (sum(evals[1:]) / len(evals[1:]) if len(evals) > 1 else evals[0])
    n = args.steps // args.every
    share = (first + (n - 1) * later) / (args.steps * step)
    print(f"evaluations: {', '.join(f'{e:.1f}' for e in evals)} s; mean step {step:.2f} s (excluding step 1)")
    print(f"a {args.steps}-step run evaluated every {args.every} steps: ({first:.1f} + {n - 1} x {later:.1f}) / "
          f"({args.steps} x {step:.2f}) = {100 * share:.1f}% of the training time (target <= 10%)")
    print("RESULT " + json.dumps({"eval_s": evals, "step_s": step, "every": args.every, "steps": args.steps,
                                  "share": share, "target": 0.10, "met": share <= 0.10}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
