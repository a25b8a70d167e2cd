#!/usr/bin/env python
"""The paper's ladder at small scale (issue #13 item 4): six variants, the trained text two-tower and
the two untrained baselines, with an equal budget, each with its probes, on the demo's test split.

    python scripts/ladder.py --root /work/exp/ladder --seeds 0 1        # all rungs, both seeds
    python scripts/ladder.py --root /work/exp/ladder --only notellm2 --seeds 0
    python scripts/ladder.py --root /work/exp/ladder --table-only       # rebuild the table

Budget: `configs/demo_cpu.yaml` as it is (120 steps, 2 ranks x 8 pairs, lr_llm 1e-4, lr_new 2e-4) with
`model.variant=V train.seed=S data.seed=S`; the two-tower gets `configs/minilm_two_tower.yaml` with the
same steps, batch, seed and loss (and its own lr_llm). Data: the demo's data stage
(`DEMO_DATA_ONLY=1 bash scripts/demo.sh`, 3000 notes; test notes held out by note, pairs split
"both"), built into --data if missing.

Idempotent and resumable: each rung is `scripts/experiment.py`'s `run_experiment` (a finished stage
is reused, an interrupted training resumes from its checkpoint). The machine's work folder may not
survive between sessions, so every finished rung's report (a few kB: recall, intervals, wall times)
is also copied to --results (default docs/ladder/, committed); a rung whose report is there, made
with the same budget and data, is not run again. The table (--results/ladder.md) is rebuilt from
those reports after every rung.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "scripts"))

from experiment import run_experiment  # noqa: E402

VARIANTS = ("text_only", "basic_mm", "micl", "late_fusion", "late_early_fusion", "notellm2")
DEMO = "configs/demo_cpu.yaml"
TWO_TOWER = "configs/minilm_two_tower.yaml"
PROBES = ("both", "text", "image")
ABLATIONS = {"logq": "loss.logq_correction", "mask": "loss.mask_known_positives"}
KS = (10, 50, 100)


def rungs(seeds, only=None) -> list[dict]:
    """Seed-major order: a whole first seed (and the baselines) before the second seed starts."""
    out = [dict(name="untrained_notellm2", config=DEMO, overrides=["model.variant=notellm2", "train.seed=0"],
                untrained=True),
           dict(name="minilm_zero_shot", config=TWO_TOWER, overrides=["train.seed=0"], untrained=True)]
    for s in seeds:
        seed = [f"train.seed={s}", f"data.seed={s}"]
        # notellm2 first: it is also the demo's own training run (seed 0), so the demo question is answered early
        for v in ("notellm2",) + tuple(x for x in VARIANTS if x != "notellm2"):
            out.append(dict(name=f"{v}_s{s}", config=DEMO, overrides=[f"model.variant={v}", *seed], untrained=False))
        out.append(dict(name=f"two_tower_s{s}", config=TWO_TOWER, overrides=list(seed), untrained=False))
    # issue #14's negative options on the paper's model, after the ladder itself (docs/training.md, "Negatives")
    for s in seeds:
        seed = [f"train.seed={s}", f"data.seed={s}"]
        for tag, key in ABLATIONS.items():
            out.append(dict(name=f"notellm2_{tag}_s{s}", config=DEMO, overrides=["model.variant=notellm2", *seed,
                                                                               f"{key}=true"], untrained=False))
    if only:
        out = [r for r in out if any(r["name"] == o or r["name"].rsplit("_s", 1)[0] == o for o in only)]
    return out


def data_fingerprint(data: str) -> str:
    """sha256 of the mined pairs, the note split and the shard manifest: the same data, whatever folder.

    The manifest records where its inputs were (`sources.*.path`) and the mining manifest's sha256, which
    itself holds the absolute path of the views: both are dropped, so that the same data built in
    another folder or on another machine keeps its fingerprint (the pairs, the split and the catalog's
    sha256 stay in). So are the manifest's `note_stats` entry (a function of the pairs) and its
    `problem_log` entry (the name of the file listing its problems), written by newer write-shards only."""
    h = hashlib.sha256()
    for rel in ("pairs/pairs.parquet", "pairs/note_split.parquet"):
        with open(os.path.join(data, rel), "rb") as fh:
            h.update(hashlib.sha256(fh.read()).digest())
    with open(os.path.join(data, "shards", "manifest.json")) as fh:
        manifest = json.load(fh)
    manifest.pop("note_stats", None)  # derived from the pairs (hashed above); older shard sets lack it
    manifest.pop("problem_log", None)  # the file naming the manifest's problems; older shard sets lack it
    for name, src in list(manifest.get("sources", {}).items()):
        src = {k: v for k, v in src.items() if k != "path"}
        if name == "mining_manifest":
            src.pop("sha256", None)
        manifest["sources"][name] = src
    h.update(hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).digest())
    return h.hexdigest()[:16]


def budget_key(rung: dict, data_fp: str) -> str:
    """What makes two reports of a rung comparable: the config file's text, the overrides, the data."""
    text = open(os.path.join(REPO, rung["config"])).read()
    payload = json.dumps([text, rung["overrides"], rung["untrained"], data_fp], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def ensure_note_stats(data: str) -> None:
    """The ablations' negative options read shards/note_stats.parquet: written from the train shards when
    an older write-shards made them (the fingerprint leaves it out: it is a function of the pairs)."""
    if not os.path.exists(os.path.join(data, "shards", "note_stats.parquet")):
        from notellm2.data_shards.writing.note_stats import backfill_note_stats

        print(f"[ladder] writing {data}/shards/note_stats.parquet (the ablations' negative options)", flush=True)
        backfill_note_stats(os.path.join(data, "shards"))


def ensure_data(data: str) -> None:
    if os.path.exists(os.path.join(data, "shards", "manifest.json")):
        return
    print(f"[ladder] building the demo's data in {data}", flush=True)
    env = {**os.environ, "DEMO_DATA_ONLY": "1", "DEMO_DIR": os.path.abspath(data)}
    subprocess.check_call(["bash", "scripts/demo.sh"], cwd=REPO, env=env)


def _mean_spread(values: list[float], fmt: str = ".3f") -> str:
    if not values:
        return "-"
    m = sum(values) / len(values)
    return f"{m:{fmt}} ± {(max(values) - min(values)) / 2:{fmt}}" if len(values) > 1 else f"{m:{fmt}}"


def _with_ci(run: dict, subset: str, k: int) -> str:
    sub = run["subsets"].get(subset)
    if not sub or str(k) not in sub.get("recall", {}):  # an n/a subset (empty, or equal to all) has no figures
        return "-"
    lo, hi = sub["ci"][str(k)]
    return f"{sub['recall'][str(k)]:.3f} [{lo:.3f}, {hi:.3f}]"


def build_table(results: str) -> str:
    """ladder.md from every report in `results`: one row per run and probe (intervals), then the
    mean ± half-range over seeds per variant and probe, with the chance level K / pool."""
    reports = []
    for f in sorted(os.listdir(results)):
        if f.endswith(".json") and f != "ladder.json":
            reports.append(json.load(open(os.path.join(results, f))))
    if not reports:
        return ""
    order = {r["name"]: i for i, r in enumerate(rungs([0, 1, 2, 3]))}
    reports.sort(key=lambda r: (order.get(r["name"], 999), r["name"]))
    merged = {k: v for k, v in reports[0]["eval"].items() if k != "runs"}
    merged["runs"] = [run for r in reports for run in r["eval"]["runs"]]
    lines = ["# The ladder (generated by scripts/ladder.py; do not edit by hand)", "",
             f"Test split, protocol {merged['protocol']}: " +
             ", ".join(f"{k} {v}" for k, v in merged["protocol_stats"].items()),
             "", "95% bootstrap intervals over queries. `name:text` / `name:image` are the probes.", "",
             "| run | " + " | ".join(f"all R@{k}" for k in KS) + " | short-query R@100 | queries | pool |",
             "|---" * (4 + len(KS)) + "|"]
    for run in merged["runs"]:
        cells = [_with_ci(run, "all", k) for k in KS] + [_with_ci(run, "short_query", 100)]
        lines.append(f"| {run['name']} | " + " | ".join(cells) + f" | {run['num_queries']} | {run['pool_size']} |")
    lines += ["", "Every subset (long queries, short/long targets) is in the JSON reports beside this file.", ""]
    # chance: a random encoder's R@K = K / pool (the full-input pool; the image probe's is a little smaller)
    pool = reports[0]["eval"]["runs"][0]["pool_size"]
    lines += [f"Chance (random encoder, pool {pool}): " + ", ".join(f"R@{k} {k / pool:.3f}" for k in KS), ""]
    lines += ["## Over seeds (mean ± half the range)", "",
              "| variant | probe | seeds | " + " | ".join(f"all R@{k}" for k in KS) +
              " | short-query R@100 | train wall (s) |", "|---" * (5 + len(KS)) + "|"]
    groups: dict = {}
    for r in reports:
        base = r["name"].rsplit("_s", 1)[0] if not r["untrained"] else r["name"]
        for run in r["eval"]["runs"]:
            probe = run["name"].split(":", 1)[1] if ":" in run["name"] else "both"
            g = groups.setdefault((base, probe), {"n": 0, "k": {k: [] for k in KS}, "short": [], "wall": []})
            g["n"] += 1
            for k in KS:
                g["k"][k].append(run["subsets"]["all"]["recall"][str(k)])
            short = run["subsets"].get("short_query", {}).get("recall", {}).get("100")
            if short is not None:
                g["short"].append(short)
            if probe == "both" and "train_s" in r["times"]:
                g["wall"].append(r["times"]["train_s"])
    for (base, probe), g in groups.items():
        lines.append(f"| {base} | {probe} | {g['n']} | " + " | ".join(_mean_spread(g["k"][k]) for k in KS) +
                     f" | {_mean_spread(g['short'])} | {_mean_spread(g['wall'], '.0f')} |")
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="work folder: one sub-folder per rung (runs, exports, embeddings)")
    ap.add_argument("--data", default=os.path.join(REPO, "artifacts", "demo"), help="the demo's data stage")
    ap.add_argument("--results", default=os.path.join(REPO, "docs", "ladder"), help="where finished reports are kept")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--only", nargs="+", help="rung names or variant names (e.g. notellm2 two_tower)")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args(argv)
    os.makedirs(args.results, exist_ok=True)
    if not args.table_only:
        ensure_data(args.data)
        fp = data_fingerprint(args.data)
        catalog = os.path.join(os.path.abspath(args.data), "catalog.jsonl")
        for rung in rungs(args.seeds, args.only):
            key = budget_key(rung, fp)
            kept = os.path.join(args.results, f"{rung['name']}.json")
            if os.path.exists(kept) and json.load(open(kept)).get("budget_key") == key:
                print(f"[ladder] {rung['name']}: done (kept report {kept})", flush=True)
                continue
            if any(o.startswith(tuple(ABLATIONS.values())) for o in rung["overrides"]):
                ensure_note_stats(args.data)
            t0 = time.time()
            print(f"[ladder] {rung['name']}: {' '.join(rung['overrides'])} ({time.strftime('%H:%M:%S')})", flush=True)
            res = run_experiment(rung["name"], args.root, args.data, rung["config"], "test", 2, KS,
                                 rung["untrained"], REPO, rung["overrides"], PROBES, "paper", catalog)
            small = {"name": rung["name"], "config": rung["config"], "overrides": rung["overrides"],
                     "untrained": rung["untrained"], "variant": res["variant"], "budget_key": key, "data": fp,
                     "times": res["times"], "eval": {k: v for k, v in res.items()
                                                     if k in ("protocol", "protocol_stats", "backend", "bootstrap",
                                                              "subset_rules", "runs")}}
            for run in small["eval"]["runs"]:
                run.pop("embeddings", None)  # a path on the machine that ran it
            with open(kept + ".tmp", "w") as fh:
                json.dump(small, fh, indent=1)
            os.replace(kept + ".tmp", kept)
            print(f"[ladder] {rung['name']}: finished in {time.time() - t0:.0f} s", flush=True)
            _write_table(args.results)
    _write_table(args.results)
    return 0


def _write_table(results: str) -> None:
    table = build_table(results)
    if table:
        with open(os.path.join(results, "ladder.md.tmp"), "w") as fh:
            fh.write(table)
        os.replace(os.path.join(results, "ladder.md.tmp"), os.path.join(results, "ladder.md"))
        print(table, flush=True)


if __name__ == "__main__":
    sys.exit(main())
