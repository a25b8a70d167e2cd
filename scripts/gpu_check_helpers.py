#!/usr/bin/env python
"""Helpers of scripts/gpu_check.sh (one subcommand per job; each exits non-zero with one line saying why).

    gpu_check_helpers.py env                         versions; exit 0 only where CUDA is usable
    gpu_check_helpers.py inputs ROOT                 tiny Llama + tiny CLIP + synthetic shards -> ROOT/inputs.json
    gpu_check_helpers.py verify-run RUN --steps N [--resumed-at S --log LOG] [--nccl-log LOG]
    gpu_check_helpers.py verify-embed DIR --count N
    gpu_check_helpers.py field JSON KEY              one value of a JSON file (the paths inputs wrote)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def fail(msg: str) -> int:
    print(f"[gpu_check] check failed: {msg}", flush=True)
    return 1


def cmd_env(args) -> int:
    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
        info["bf16"] = torch.cuda.is_bf16_supported()
    for name in ("transformers", "deepspeed", "webdataset", "braceexpand", "accelerate", "flash_attn"):
        try:
            mod = __import__(name)
            info[name] = getattr(mod, "__version__", "?")
        except Exception as e:  # noqa: BLE001 - report any import failure
            info[name] = f"absent ({type(e).__name__})"
    print(json.dumps(info), flush=True)
    return 0 if info["cuda_available"] else 1


def cmd_inputs(args) -> int:
    from tests.helpers.real_setup import build_inputs

    inputs = build_inputs(args.root)
    shards = os.path.dirname(inputs["train_shards"])
    with open(os.path.join(shards, "manifest.json")) as fh:
        manifest = json.load(fh)
    inputs["notes_val"] = os.path.join(shards, manifest["patterns"]["notes-val"])
    inputs["notes_val_count"] = int(manifest["counts"]["val"]["notes_written"])
    path = os.path.join(args.root, "inputs.json")
    with open(path, "w") as fh:
        json.dump(inputs, fh, indent=1)
    print(json.dumps(inputs), flush=True)
    return 0


def cmd_field(args) -> int:
    with open(args.json) as fh:
        print(json.load(fh)[args.key])
    return 0


def cmd_verify_run(args) -> int:
    from notellm2.launcher.train import checkpoint as ckpt

    path = os.path.join(args.run, "metrics.jsonl")
    if not os.path.exists(path):
        return fail(f"{path} is missing")
    steps = {}
    with open(path) as fh:
        for line in fh:
            rec = json.loads(line)
            steps[rec["step"]] = rec
    if sorted(steps) != list(range(1, args.steps + 1)):
        return fail(f"{path}: steps {sorted(steps)}, expected 1..{args.steps}")
    losses = [steps[s].get("loss/total") for s in sorted(steps)]
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in losses):
        return fail(f"{path}: a loss is not finite: {losses}")
    last = ckpt.latest_complete(ckpt.checkpoint_root(args.run))
    if last is None or ckpt.read_manifest(last)["step"] != args.steps:
        return fail(f"{args.run}: the last complete checkpoint is {last}, expected step {args.steps}")
    if args.resumed_at is not None:
        with open(args.log, errors="replace") as fh:
            text = fh.read()
        if f"resumed step {args.resumed_at}" not in text:
            return fail(f"{args.log}: no 'resumed step {args.resumed_at}' line")
    if args.nccl_log:
        with open(args.nccl_log, errors="replace") as fh:
            if "NCCL INFO" not in fh.read():
                return fail(f"{args.nccl_log}: no 'NCCL INFO' line (NCCL_DEBUG=INFO): the run did not use NCCL")
    print(f"[gpu_check] {args.run}: steps 1..{args.steps}, loss {losses[0]:.4f} -> {losses[-1]:.4f}, "
          f"checkpoint step {args.steps}" + (f", resumed at {args.resumed_at}" if args.resumed_at else ""), flush=True)
    return 0


def cmd_verify_embed(args) -> int:
    import numpy as np

    emb = np.load(os.path.join(args.dir, "embeddings.npy"))
    with open(os.path.join(args.dir, "embeddings.json")) as fh:
        meta = json.load(fh)
    if emb.shape[0] != args.count:
        return fail(f"{args.dir}: {emb.shape[0]} embeddings, expected {args.count}")
    if not np.isfinite(emb).all():
        return fail(f"{args.dir}: embeddings are not finite")
    norms = np.linalg.norm(emb, axis=1)
    if np.abs(norms - 1).max() > 1e-2:
        return fail(f"{args.dir}: norms {norms.min():.4f}..{norms.max():.4f}, expected 1")
    print(f"[gpu_check] {args.dir}: {emb.shape[0]} x {emb.shape[1]} unit vectors; meta {json.dumps(meta)}", flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("env").set_defaults(fn=cmd_env)
    s = sub.add_parser("inputs")
    s.add_argument("root")
    s.set_defaults(fn=cmd_inputs)
    s = sub.add_parser("field")
    s.add_argument("json")
    s.add_argument("key")
    s.set_defaults(fn=cmd_field)
    s = sub.add_parser("verify-run")
    s.add_argument("run")
    s.add_argument("--steps", type=int, required=True)
    s.add_argument("--resumed-at", type=int, default=None)
    s.add_argument("--log", default=None)
    s.add_argument("--nccl-log", default=None)
    s.set_defaults(fn=cmd_verify_run)
    s = sub.add_parser("verify-embed")
    s.add_argument("dir")
    s.add_argument("--count", type=int, required=True)
    s.set_defaults(fn=cmd_verify_embed)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
