#!/usr/bin/env python
"""How a run's training moved (issue #26 item 6): from each run's `metrics.jsonl`, the mean of the first
and of the last N logged steps of the visual loss (mICL's, `loss/vis`), the note loss (`loss/mm`), the
late-fusion gate (`model/gate_mean`) and the learnable temperature (`model/logit_scale`), beside the
chance level of the in-batch loss, ln(candidates per anchor), from the run's resolved config and the
ranks its metrics name.

    python scripts/run_dynamics.py /work/exp/bench/notellm2_lr1e-04_s0 /work/exp/bench/notellm2_visw0_lr1e-04_s0
    python scripts/run_dynamics.py --window 10 RUN_DIR... [--out table.md]

A RUN_DIR is a ladder rung's folder (its training is RUN_DIR/run) or a training's output folder. A metric
a run does not log (no visual loss in `late_fusion`, no gate in `micl`) shows as "-". Ends with one
`RESULT {json}` line.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

METRICS = (("loss/vis", "visual loss"), ("loss/mm", "note loss"), ("model/gate_mean", "gate mean"),
           ("model/logit_scale", "temperature (logit scale)"))


def _run_file(run_dir: str, name: str) -> str | None:
    """RUN_DIR/run/NAME (a ladder rung) or RUN_DIR/NAME (a training's output folder), whichever exists."""
    for cand in (os.path.join(run_dir, "run", name), os.path.join(run_dir, name)):
        if os.path.isfile(cand):
            return cand
    return None


def _chance(run_dir: str, world: int) -> float | None:
    """ln(candidates per anchor) of the gathered in-batch loss: the 2 x pairs_per_rank x world notes of the
    step but the anchor itself (docs/training.md, the loss)."""
    import yaml

    path = _run_file(run_dir, "config.resolved.yaml")
    if path is None or not world:
        return None
    with open(path) as fh:
        per_rank = ((yaml.safe_load(fh) or {}).get("data") or {}).get("pairs_per_rank")
    return math.log(2 * int(per_rank) * world - 1) if per_rank else None


def dynamics(run_dir: str, window: int = 10) -> dict:
    """{metric: (first-window mean, last-window mean) or None} plus steps and chance, for one run."""
    from compare_scalars import read_steps  # this folder's reader of metrics.jsonl (one record per step)

    path = _run_file(run_dir, "metrics.jsonl")
    if path is None:
        raise SystemExit(f"run_dynamics: {run_dir!r} has no metrics.jsonl (looked in RUN_DIR/run and RUN_DIR)")
    by_step = read_steps(path)
    if not by_step:
        raise SystemExit(f"run_dynamics: {path} holds no training step")
    steps = [by_step[k] for k in sorted(by_step)]
    world = sum(1 for k in steps[0] if k.startswith("memory/rank") and k.endswith("_mb"))  # one per rank
    out = {"run": os.path.basename(os.path.normpath(run_dir)), "steps": int(steps[-1]["step"]),
           "chance": _chance(run_dir, world), "window": window}
    for key, _ in METRICS:
        vals = [float(r[key]) for r in steps if key in r]
        out[key] = None if not vals else (sum(vals[:window]) / len(vals[:window]), sum(vals[-window:]) / len(vals[-window:]))
    return out


def to_markdown(rows: list[dict]) -> str:
    head = "| run | steps | chance ln(B) | " + " | ".join(f"{label}, first -> last" for _, label in METRICS) + " |"
    lines = [head, "|---" * (3 + len(METRICS)) + "|"]
    for r in rows:
        cells = ["-" if r[k] is None else f"{r[k][0]:.3f} -> {r[k][1]:.3f}" for k, _ in METRICS]
        chance = "-" if r["chance"] is None else f"{r['chance']:.2f}"
        lines.append(f"| {r['run']} | {r['steps']} | {chance} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders (a ladder rung's, or a training's output folder)")
    ap.add_argument("--window", type=int, default=10, help="logged steps averaged at each end (default 10)")
    ap.add_argument("--out", default=None, help="also write the table here (markdown)")
    args = ap.parse_args(argv)
    if args.window <= 0:
        raise SystemExit(f"run_dynamics: --window: got {args.window}; allowed: an integer > 0")
    rows = [dynamics(r, args.window) for r in args.runs]
    text = to_markdown(rows)
    print(text, end="")
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    print("RESULT " + json.dumps({"name": "run_dynamics", "window": args.window, "runs": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
