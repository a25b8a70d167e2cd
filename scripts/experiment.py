#!/usr/bin/env python
"""One measured training experiment: train -> export -> embed a split's notes (each probe) -> Recall@K.

    python scripts/experiment.py --name lr1e-4 --root /work/exp/runs --data /work/exp/demo \
        --config configs/demo_cpu.yaml -- train.lr_llm=1e-4

Every stage is idempotent: a finished stage (its output file exists) is skipped, an interrupted
training run resumes from its last complete checkpoint (`checkpoint.resume: auto`). Diagnosis runs
score on the *val* split so that the test split stays untouched until the ladder (scripts/ladder.py,
which calls `run_experiment` once per rung). Results go to ROOT/NAME/result.json (the eval report of
every probe, one row each, plus wall times and the overrides) and one line `RESULT {json}` on stdout.
`--untrained` embeds with the config's untrained model instead (the zero-shot baseline) and skips
training. `--probes both text image` embeds each probe (`notellm2 embed --mode`); a probe the
variant does not have (the image probe of a text variant) is skipped. `--vision-cache DIR` (a
`notellm2 data cache-vision` folder of the run's tower) makes training and every embedding read the
tower's features instead of running it. `plan_experiment` returns the commands without running them.
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


def _variant(config: str, overrides: list[str], repo: str) -> str:
    for ov in overrides:
        if ov.startswith("model.variant="):
            return ov.split("=", 1)[1]
    sys.path.insert(0, repo)
    from notellm2.launcher.config import load_config

    return load_config(os.path.join(repo, config) if not os.path.isabs(config) else config).model.variant


def plan_experiment(name: str, root: str, data: str, config: str = "configs/demo_cpu.yaml", split: str = "val",
                    nproc: int = 2, ks=(10, 50, 100), untrained: bool = False, repo: str = REPO,
                    overrides=(), probes=("both",), protocol: str = "paper", catalog: str | None = None,
                    vision_cache: str | None = None) -> dict:
    """What `run_experiment` runs, without running it: {"out", "variant", "probes", "report", "steps"}, each
    step {"stage", "cmd", "done"} in order (a done stage is skipped; eval always runs). `vision_cache`: a
    `notellm2 data cache-vision` folder of the run's tower; training and every embedding then read the
    tower's features from it instead of running the tower (ignored by a variant that never sees an image)."""
    sys.path.insert(0, repo)
    from notellm2.modeling.names import probe_unavailable

    out = os.path.join(os.path.abspath(root), name)
    py = sys.executable
    torchrun = [os.path.join(os.path.dirname(py), "torchrun"), "--standalone", f"--nproc-per-node={nproc}"]
    d = os.path.abspath(data)
    notes = f"{d}/shards/notes-{split}-*.tar"
    variant = _variant(config, list(overrides), repo)
    sees_images = not probe_unavailable(variant, "image")
    cache = os.path.abspath(vision_cache) if vision_cache and sees_images else None
    data_ov = [f"data.train_shards={d}/shards/pairs-train-*.tar", f"data.val_shards={d}/shards/pairs-val-*.tar",
               f"data.notes_shards={notes}", f"train.output_dir={out}/run", "checkpoint.resume=auto"]
    ov = data_ov + ([f"data.vision_cache={cache}"] if cache else []) + list(overrides)
    # a probe the variant lacks is skipped, and so is the text probe of a variant that never sees an
    # image (it is the full input again)
    probes = [p for p in probes if not probe_unavailable(variant, p) and (p != "text" or sees_images)]
    emb = {p: os.path.join(out, f"emb_{split}" + ("" if p == "both" else f"_{p}")) for p in probes}
    steps = []
    if not untrained:
        steps.append({"stage": "train", "done": os.path.exists(os.path.join(out, "train.done")),
                      "cmd": torchrun + ["-m", "notellm2.launcher", "train", "--config", config, *ov]})
        steps.append({"stage": "export", "done": os.path.exists(os.path.join(out, "export", "config.yaml")),
                      "cmd": [py, "-m", "notellm2.launcher", "export", "--run-dir", f"{out}/run", "--out",
                              f"{out}/export", "--overwrite"]})
    for p, e in emb.items():
        src = ["--config", config, *ov] if untrained else \
            ["--model", f"{out}/export", "--shards", notes, *(["--vision-cache", cache] if cache else [])]
        steps.append({"stage": f"embed_{p}", "done": os.path.exists(os.path.join(e, "embeddings.npy")),
                      "cmd": torchrun + ["-m", "notellm2.launcher", "embed", *src, "--mode", p, "--out", e]})
    report = os.path.join(out, f"recall_{split}.json")
    names = [f"{name}={emb['both']}"] + [f"{name}:{p}={e}" for p, e in emb.items() if p != "both"]
    cmd = [py, "-m", "notellm2.launcher", "eval", "--embeddings", *names, "--pairs", f"{d}/pairs", "--split", split,
           "--protocol", protocol, "--k", *map(str, ks), "--out", report]
    if catalog:
        cmd += ["--catalog", catalog]
    steps.append({"stage": "eval", "done": False, "cmd": cmd})
    return {"out": out, "variant": variant, "probes": probes, "report": report, "steps": steps}


def run_experiment(name: str, root: str, data: str, config: str = "configs/demo_cpu.yaml", split: str = "val",
                   nproc: int = 2, ks=(10, 50, 100), untrained: bool = False, repo: str = REPO,
                   overrides=(), probes=("both",), protocol: str = "paper", catalog: str | None = None,
                   vision_cache: str | None = None) -> dict:
    """Run (or finish) one experiment and return its result (also written to ROOT/NAME/result.json)."""
    plan = plan_experiment(name, root, data, config, split, nproc, ks, untrained, repo, overrides, probes, protocol,
                           catalog, vision_cache)
    out = plan["out"]
    os.makedirs(out, exist_ok=True)
    log = os.path.join(out, "log.txt")
    times: dict = {}
    for step in plan["steps"]:
        if step["done"]:
            continue
        took = sh(step["cmd"], log, repo)
        if step["stage"] == "train":
            open(os.path.join(out, "train.done"), "w").write("")
        if step["stage"] != "eval":
            times[f"{step['stage']}_s"] = took
    res = {"name": name, "config": config, "overrides": list(overrides), "untrained": untrained, "split": split,
           "variant": plan["variant"], **json.load(open(plan["report"])), "times": times}
    prev = os.path.join(out, "result.json")
    if os.path.exists(prev):  # keep the wall times of stages run by an earlier call
        res["times"] = {**json.load(open(prev)).get("times", {}), **times}
    with open(prev + ".tmp", "w") as fh:
        json.dump(res, fh, indent=2)
    os.replace(prev + ".tmp", prev)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True)
    ap.add_argument("--root", required=True, help="folder holding one sub-folder per experiment")
    ap.add_argument("--data", required=True, help="folder with shards/ and pairs/ (the demo's data stage)")
    ap.add_argument("--config", default="configs/demo_cpu.yaml")
    ap.add_argument("--split", default="val", choices=["val", "test"])
    ap.add_argument("--protocol", default="paper", choices=["paper", "all-pairs"])
    ap.add_argument("--probes", nargs="+", default=["both"], choices=["both", "text", "image"])
    ap.add_argument("--catalog", help="catalog JSONL: adds the short/long subsets")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--k", type=int, nargs="+", default=[10, 50, 100])
    ap.add_argument("--untrained", action="store_true")
    ap.add_argument("--vision-cache", help="a `notellm2 data cache-vision` folder of the run's tower (the tower then never runs)")
    ap.add_argument("--repo", default=REPO, help="checkout whose code runs (default: this script's)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    res = run_experiment(args.name, args.root, args.data, args.config, args.split, args.nproc, args.k,
                         args.untrained, args.repo, args.overrides, args.probes, args.protocol, args.catalog,
                         args.vision_cache)
    print("RESULT " + json.dumps({"name": args.name, "recall": {r["name"]: r["subsets"]["all"]["recall"]
                                                                 for r in res["runs"]}, "times": res["times"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
