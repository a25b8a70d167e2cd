#!/usr/bin/env python
"""Does a change to the trainer keep its numbers? Run the same fixed-seed tiny training in two
checkouts and compare their per-step scalars bitwise.

Each run: `configs/tiny_cpu.yaml` on 2 CPU ranks (torchrun --standalone), with the tiny Llama, tiny CLIP
and synthetic shards of the tests (tests/helpers/real_inputs.py, built once under --work and shared by
both runs; nothing downloaded), `train.max_steps=8` and a checkpoint every 4 steps. A checkout runs
as itself: cwd and PYTHONPATH are that checkout, so `-m notellm2.launcher train` is its own trainer.

Compared, every step of rank 0's `metrics.jsonl`: the `loss/*`, `lr/*`, `optim/grad_norm` and `model/*`
scalars, for exact float equality (the bits of the float64 written to the JSONL; perf/, memory/ and
data/ figures are timings and sizes, not compared). Prints each differing step/key, then one line
`RESULT {json}`; exits 0 when every compared value is identical, 1 when not, 2 when a run failed.

    .venv/bin/python scripts/compare_scalars.py --base /tmp/base --head .      # two checkouts
    .venv/bin/python scripts/compare_scalars.py --repo .                        # one run, its metrics path
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPARED_PREFIXES = ("loss/", "lr/", "model/")
COMPARED_KEYS = ("optim/grad_norm",)


def compared(key: str) -> bool:
    return key.startswith(COMPARED_PREFIXES) or key in COMPARED_KEYS


def build_inputs(work: str) -> list[str]:
    """The tiny models and shards as config overrides, built once per --work (from this script's checkout)."""
    sys.path.insert(0, REPO)
    from tests.helpers.real_inputs import cached_tiny_cpu_overrides

    return cached_tiny_cpu_overrides(work)


def launcher_module(repo: str) -> str:
    """The checkout's CLI module: `notellm2.launcher` under the import root, `launcher` before it."""
    return "notellm2.launcher" if os.path.isfile(os.path.join(repo, "notellm2", "__init__.py")) else "launcher"


def git_commit(repo: str) -> str:
    try:
        head = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except OSError:
        return "?"


def run_training(repo: str, label: str, work: str, inputs: list[str], steps: int, every: int, timeout_s: float,
                 extra: tuple = (), reuse: bool = False) -> str:
    """One fresh 2-rank run of `repo`'s trainer; returns its metrics.jsonl path (raises on failure).
    reuse: keep an earlier run of the same label when its metrics hold all `steps` steps."""
    repo = os.path.abspath(repo)
    run_dir = os.path.join(work, f"run-{label}")
    if reuse and os.path.exists(os.path.join(run_dir, "metrics.jsonl")) \
            and len(read_steps(os.path.join(run_dir, "metrics.jsonl"))) == steps:
        print(f"{label}: reusing {run_dir}", flush=True)
        return os.path.join(run_dir, "metrics.jsonl")
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    env = dict(os.environ, PYTHONPATH=repo, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", launcher_module(repo), "train", "--config", os.path.join(repo, "configs", "tiny_cpu.yaml"), *inputs,
           f"train.output_dir={run_dir}", f"train.max_steps={steps}", f"checkpoint.every_steps={every}",
           "checkpoint.resume=none", *extra]
    log_path = os.path.join(work, f"run-{label}.log")
    t0 = time.monotonic()
    with open(log_path, "w") as fh:
        try:
            rc = subprocess.run(cmd, cwd=repo, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = -999
    print(f"{label}: {repo} ({git_commit(repo)}) exit {rc} in {time.monotonic() - t0:.0f}s, log {log_path}", flush=True)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if rc != 0 or not os.path.exists(metrics):
        with open(log_path, errors="replace") as fh:
            sys.stderr.write(fh.read()[-4000:])
        raise RuntimeError(f"{label}: training failed (exit {rc}); see {log_path}")
    return metrics


def read_steps(path: str) -> dict[int, dict]:
    """{step: its record} of a run's metrics.jsonl (one line per step); a damaged line stops with file and line."""
    out = {}
    with open(path) as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{i}: not JSON ({e.msg})") from None
            out[int(rec["step"])] = rec
    return out


def bits(value) -> bytes | None:
    return struct.pack("<d", float(value)) if isinstance(value, (int, float)) else None


def compare(base: dict[int, dict], head: dict[int, dict], ignore: tuple = ()) -> dict:
    """Bitwise comparison of the compared scalars of every step; a step or key present on one side only differs.
    `ignore`: key prefixes left out (e.g. `lr/` across a change that fixes which step's rate is logged)."""
    diffs, n_values, keys = [], 0, set()
    for step in sorted(set(base) | set(head)):
        b, h = base.get(step), head.get(step)
        if b is None or h is None:
            diffs.append({"step": step, "key": "<step>", "base": b is not None, "head": h is not None})
            continue
        for key in sorted(k for k in set(b) | set(h) if compared(k) and not k.startswith(tuple(ignore))):
            keys.add(key)
            n_values += 1
            bv, hv = b.get(key), h.get(key)
            if bv is None or hv is None or bits(bv) != bits(hv):
                delta = (hv - bv) if bv is not None and hv is not None and math.isfinite(hv - bv) else None
                diffs.append({"step": step, "key": key, "base": bv, "head": hv, "delta": delta})
    # Informational (not part of the verdict): every logged key, compared or not, in the same order.
    same_names = all(list(base[s]) == list(head[s]) for s in set(base) & set(head))
    return {"steps": len(set(base) | set(head)), "keys": sorted(keys), "values_compared": n_values, "differences": diffs,
            "same_key_order": same_names}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", help="checkout of the reference (e.g. the branch point)")
    ap.add_argument("--head", help="checkout of the change")
    ap.add_argument("--repo", help="only run this checkout and print its metrics.jsonl path")
    ap.add_argument("--work", default="/tmp/compare_scalars", help="inputs, runs and logs (inputs built once)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--every", type=int, default=4, help="checkpoint.every_steps")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    ap.add_argument("--reuse-base", action="store_true", help="keep the base run of an earlier call in --work")
    ap.add_argument("--head-override", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override for the head run only (a negative control: train.seed=1 must differ)")
    ap.add_argument("--ignore", action="append", default=[], metavar="PREFIX",
                    help="leave keys with this prefix out of the comparison (repeatable), e.g. lr/")
    args = ap.parse_args(argv)
    if not args.repo and not (args.base and args.head):
        ap.error("give --repo DIR, or --base DIR --head DIR")
    os.makedirs(args.work, exist_ok=True)
    inputs = build_inputs(args.work)
    try:
        if args.repo:
            path = run_training(args.repo, "repo", args.work, inputs, args.steps, args.every, args.timeout)
            print(f"RESULT {json.dumps({'name': 'compare_scalars', 'repo': os.path.abspath(args.repo), 'commit': git_commit(args.repo), 'metrics': path, 'steps': len(read_steps(path))})}")
            return 0
        base_path = run_training(args.base, "base", args.work, inputs, args.steps, args.every, args.timeout,
                                 reuse=args.reuse_base)
        head_path = run_training(args.head, "head", args.work, inputs, args.steps, args.every, args.timeout,
                                 extra=tuple(args.head_override))
    except RuntimeError as e:
        print(f"RESULT {json.dumps({'name': 'compare_scalars', 'identical': False, 'error': str(e)})}")
        return 2
    result = compare(read_steps(base_path), read_steps(head_path), tuple(args.ignore))
    for d in result["differences"]:
        print(f"DIFF step {d['step']} {d['key']}: base {d['base']!r} head {d['head']!r}"
              + (f" (head - base = {d['delta']:.3g})" if d.get("delta") is not None else ""))
    identical = not result["differences"] and result["values_compared"] > 0
    summary = {"name": "compare_scalars", "identical": identical, "steps": result["steps"],
               "keys": result["keys"], "values_compared": result["values_compared"],
               "differing": len(result["differences"]), "same_key_order": result["same_key_order"],
               "head_overrides": args.head_override, "ignored": args.ignore,
               "base": {"repo": os.path.abspath(args.base), "commit": git_commit(args.base)},
               "head": {"repo": os.path.abspath(args.head), "commit": git_commit(args.head)}}
    print(f"RESULT {json.dumps(summary)}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
