#!/usr/bin/env python
"""One measured training experiment: train -> export -> embed a split's notes -> Recall@K on that split.

    python scripts/experiment.py --name lr1e-4 --root /work/exp/runs --data /work/exp/demo \
        --config configs/demo_cpu.yaml -- train.lr_llm=1e-4

Every stage is idempotent: a finished stage (its output file exists) is skipped, an interrupted
training run resumes from its last complete checkpoint (`checkpoint.resume: auto`). Diagnosis runs
score on the *val* split so that the test split stays untouched until the ladder. Results go to
ROOT/NAME/result.json (the eval report plus wall times and the overrides) and one line
`RESULT {json}` on stdout. `--untrained` embeds with the config's untrained model instead (the
zero-shot baseline) and skips training.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sh(cmd: list[str], log: str, cwd: str) -> float:
    t = time.time()
    with open(log, "a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd)
    if rc != 0:
        raise SystemExit(f"experiment: `{' '.join(cmd[:6])} ...` failed with code {rc}; see {log}")
    return time.time() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True)
    ap.add_argument("--root", required=True, help="folder holding one sub-folder per experiment")
    ap.add_argument("--data", required=True, help="folder with shards/ and pairs/ (the demo's data stage)")
    ap.add_argument("--config", default="configs/demo_cpu.yaml")
    ap.add_argument("--split", default="val", choices=["val", "test"])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--k", type=int, nargs="+", default=[10, 50, 100])
    ap.add_argument("--untrained", action="store_true")
    ap.add_argument("--repo", default=REPO, help="checkout whose code runs (default: this script's)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)

    out = os.path.join(os.path.abspath(args.root), args.name)
    os.makedirs(out, exist_ok=True)
    log = os.path.join(out, "log.txt")
    py = sys.executable
    torchrun = [os.path.join(os.path.dirname(py), "torchrun"), "--standalone", f"--nproc-per-node={args.nproc}"]
    d = os.path.abspath(args.data)
    data_ov = [f"data.train_shards={d}/shards/pairs-train-*.tar", f"data.val_shards={d}/shards/pairs-val-*.tar",
               f"data.notes_shards={d}/shards/notes-{args.split}-*.tar", f"train.output_dir={out}/run",
               "checkpoint.resume=auto"]
    ov = data_ov + list(args.overrides)
    times = {}
    emb = os.path.join(out, f"emb_{args.split}")
    if args.untrained:
        if not os.path.exists(os.path.join(emb, "embeddings.npy")):
            times["embed_s"] = sh(torchrun + ["-m", "launcher", "embed", "--config", args.config, *ov, "--out", emb], log, args.repo)
    else:
        if not os.path.exists(os.path.join(out, "export", "config.yaml")) and not os.path.exists(os.path.join(out, "train.done")):
            times["train_s"] = sh(torchrun + ["-m", "launcher", "train", "--config", args.config, *ov], log, args.repo)
            open(os.path.join(out, "train.done"), "w").write("")
        if not os.path.isdir(os.path.join(out, "export")) or not os.listdir(os.path.join(out, "export")):
            times["export_s"] = sh([py, "-m", "launcher", "export", "--run-dir", f"{out}/run", "--out", f"{out}/export",
                                    "--overwrite"], log, args.repo)
        if not os.path.exists(os.path.join(emb, "embeddings.npy")):
            times["embed_s"] = sh(torchrun + ["-m", "launcher", "embed", "--model", f"{out}/export", "--shards",
                                              f"{d}/shards/notes-{args.split}-*.tar", "--out", emb], log, args.repo)
    report = os.path.join(out, f"recall_{args.split}.json")
    sh([py, "-m", "launcher", "eval", "--embeddings", emb, "--pairs", f"{d}/pairs", "--split", args.split,
        "--k", *map(str, args.k), "--out", report], log, args.repo)
    res = {"name": args.name, "overrides": args.overrides, "untrained": args.untrained, "split": args.split,
           **json.load(open(report)), "times": times}
    prev = os.path.join(out, "result.json")
    if os.path.exists(prev):  # keep the wall times of stages run by an earlier call
        res["times"] = {**json.load(open(prev)).get("times", {}), **times}
    with open(prev + ".tmp", "w") as fh:
        json.dump(res, fh, indent=2)
    os.replace(prev + ".tmp", prev)
    print("RESULT " + json.dumps({"name": args.name, "recall": res["recall"], "times": res["times"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
