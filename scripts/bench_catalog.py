#!/usr/bin/env python
"""The benchmark catalog, built in one command (issue #26 item 4; the choices and why: docs/benchmark.md):

    .venv/bin/python scripts/bench_catalog.py /work/bench_data

openclipart, every category capped at 100 notes (hash-sampled), half the notes' text blanked (picture-only
posts) -> simulated views whose sessions also walk to colour-similar notes -> co-occurrence pairs, notes
split by hash (30 % test, 15 % val; a pair keeps a split only when both its notes are in it) -> shards
(images at 260 px, Lite2's native size) -> the frozen towers' vision caches (Lite0, Lite2) over the
train and val pairs and the val and test notes, so the ladder runs each tower once. Last, OUT/summary.json:
the counts (notes, categories, blanked fraction, pairs and notes per split, the paper protocol's queries
and pool on val and test) and the share of test pairs joined by colour.

Each stage is a `notellm2` verb run in this process, with its argv recorded in OUT/.stages/NAME.json
together with the record of the stage it reads: a stage whose output exists and whose record is the same
is reused, any other is run again (its old output removed first), and so is everything downstream of it.
So a rerun after an interruption finishes the job, and a changed option rebuilds only what it changes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

DEMO_CONFIG = os.path.join(REPO, "configs", "demo_cpu.yaml")
# The frozen towers the ladder compares: config overrides on configs/demo_cpu.yaml (scripts/ladder.py uses these).
TOWERS = {
    "lite0": [],
    "lite2": ["model.vision.factory=notellm2.modeling.plugins.efficientnet_lite:build_lite2",
              "model.vision.image_size=260"],
}


def _stamp(argv: list[str], parent: str | None) -> str:
    """The record's key: the argv and the upstream stamp, with this checkout's path written as `<repo>` (the
    config is read from the checkout that runs the script, and a worktree elsewhere builds the same data)."""
    argv = [a.replace(REPO + os.sep, "<repo>" + os.sep) for a in argv]
    return hashlib.sha256(json.dumps([argv, parent]).encode()).hexdigest()[:16]


def stage(out: str, name: str, output: str, argv: list[str], parent: str | None, log=print,
          stdout_to_output: bool = False, folder: str | None = None) -> str:
    """Run `notellm2 *argv` unless `output` exists with the same record; returns this stage's stamp.
    `stdout_to_output`: the verb's standard output is the output file (written once it succeeded).
    `folder`: the folder the verb writes, when `output` is a file inside it (a cache's cache.json); a rerun
    removes the folder, not only that file, since the verb refuses a folder that exists."""
    import contextlib
    import io

    from notellm2.launcher.cli import main as notellm2

    stamp = _stamp(argv, parent)
    record = os.path.join(out, ".stages", f"{name}.json")
    if os.path.exists(output) and os.path.exists(record) and json.load(open(record)).get("stamp") == stamp:
        log(f"[bench] {name}: reused ({output})")
        return stamp
    if folder is not None and os.path.isdir(folder):
        shutil.rmtree(folder)
    if os.path.isdir(output):
        shutil.rmtree(output)
    elif os.path.exists(output):
        os.remove(output)
    if os.path.exists(record):
        os.remove(record)
    log(f"[bench] {name}: notellm2 {' '.join(argv)} ({time.strftime('%H:%M:%S')})")
    t0 = time.time()
    if stdout_to_output:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = notellm2(argv)
    else:
        rc = notellm2(argv)
    if name == "validate":
        rc = 0 if rc in (0, 1) else rc  # errors are reported (images over the pixel limit), not fatal: write-shards drops those images
    if rc != 0:
        raise SystemExit(f"bench_catalog: stage {name} failed (exit {rc}): notellm2 {' '.join(argv)}")
    if stdout_to_output:
        with open(output, "w") as fh:
            fh.write(buf.getvalue())
    os.makedirs(os.path.dirname(record), exist_ok=True)
    with open(record, "w") as fh:
        json.dump({"stamp": stamp, "argv": argv, "parent": parent, "seconds": round(time.time() - t0, 1)}, fh, indent=1)
    return stamp


def build(out: str, args) -> dict:
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    cat, views, pairs, shards = (os.path.join(out, x) for x in ("catalog.jsonl", "views.parquet", "pairs", "shards"))
    s = stage(out, "catalog", cat, ["data", "import-openclipart", "--out", cat, "--root", args.root,
                                    "--min-per-category", str(args.min_per_category),
                                    "--max-per-category", str(args.max_per_category),
                                    "--blank-text-fraction", str(args.blank_text_fraction),
                                    "--blank-seed", str(args.seed)], None)
    if args.validate:  # a report beside the data; its verdict does not stop the build
        stage(out, "validate", os.path.join(out, "validate.json"), ["data", "validate", "--catalog", cat, "--no-progress",
                                                                    "--json"], s, stdout_to_output=True)
    s = stage(out, "views", views, ["data", "simulate-views", "--catalog", cat, "--out", views, "--users", str(args.users),
                                    "--visual-browsing", str(args.visual_browsing), "--seed", str(args.seed),
                                    "--no-progress"], s)
    s = stage(out, "pairs", pairs, ["data", "mine-pairs", "--views", views, "--out", pairs, "--split-by", "hash",
                                    "--test-fraction", "0.3", "--val-fraction", str(args.val_fraction),
                                    "--pair-split", "both", "--seed", str(args.seed), "--quiet"], s)
    s = stage(out, "shards", os.path.join(shards, "manifest.json"),
              ["data", "write-shards", "--pairs", pairs, "--catalog", cat, "--out", shards,
               "--image-size", str(args.image_size), "--no-progress"], s)
    sets = [os.path.join(shards, f"{kind}-{split}-*.tar") for kind, split in
            (("pairs", "train"), ("pairs", "val"), ("notes", "val"), ("notes", "test"))]
    sets = [p for p in sets if _matches(p)]
    caches = {}
    for tower in args.towers:
        cache = os.path.join(out, "vision_cache", tower)
        stage(out, f"cache_{tower}", os.path.join(cache, "cache.json"), cache_argv(tower, sets, cache), s, folder=cache)
        caches[tower] = cache
    summary = summarise(out, cat, pairs, shards, caches, args)
    with open(os.path.join(out, "summary.json.tmp"), "w") as fh:
        json.dump(summary, fh, indent=1)
    os.replace(os.path.join(out, "summary.json.tmp"), os.path.join(out, "summary.json"))
    return summary


def cache_argv(tower: str, shard_sets: list[str], cache: str) -> list[str]:
    """`notellm2 data cache-vision` for one of TOWERS over the given shard patterns."""
    return ["data", "cache-vision", "--config", DEMO_CONFIG, *[x for p in shard_sets for x in ("--shards", p)],
            "--out", cache, "--no-progress", *TOWERS[tower]]


def _matches(pattern: str) -> bool:
    import glob

    return bool(glob.glob(pattern))


def summarise(out: str, cat: str, pairs: str, shards: str, caches: dict, args) -> dict:
    """The counts docs/benchmark.md reports, from the files themselves."""
    import numpy as np

    from notellm2.data_shards.catalog.notes import load_catalog
    from notellm2.data_shards.mining.pairs_file import read_note_split, read_pairs
    from notellm2.launcher.eval.evaluate import paper_task

    notes = load_catalog(cat)
    blank = {n.note_id for n in notes if not (n.title.strip() or n.content.strip() or n.topics)}
    category = {n.note_id: n.category for n in notes}
    split_of = read_note_split(pairs)
    manifest = json.load(open(os.path.join(shards, "manifest.json")))
    res = {"out": out, "settings": {k: v for k, v in vars(args).items() if k != "out"},
           "notes": len(notes), "categories": len(set(category.values())),
           "blanked": len(blank), "blanked_fraction": round(len(blank) / max(1, len(notes)), 4),
           "notes_by_split": {s: int((split_of["split"] == s).sum()) for s in ("train", "val", "test")},
           "pairs_by_split": {}, "paper_protocol": {},
           "images_dropped_by_write_shards": manifest["problems"]["bad_image"]["count"],
           "vision_caches": caches}
    every = read_pairs(pairs, columns=["query_id", "target_id", "split"])
    for split in ("train", "val", "test"):
        df = every[every["split"] == split]  # may be empty (a small catalog)
        res["pairs_by_split"][split] = len(df)
        if split == "train" or df.empty:
            continue
        ids = split_of.loc[split_of["split"] == split, "note_id"].tolist()
        task = paper_task(list(zip(df["query_id"], df["target_id"])), ids)
        q, t = task.query_ids, task.target_ids
        res["paper_protocol"][split] = {
            "queries": len(q), "pool": len(task.pool_ids),
            "blanked_queries": round(float(np.mean([x in blank for x in q])), 4),
            "blanked_targets": round(float(np.mean([x in blank for x in t])), 4),
            "blanked_pool": round(float(np.mean([x in blank for x in task.pool_ids])), 4),
            "same_category_pairs": round(float(np.mean([category.get(a) == category.get(b) for a, b in zip(q, t)])), 4),
            **category_only(q, t, task.pool_ids, category)}
    if args.visual_browsing > 0:
        res["colour_neighbour_test_pairs"] = colour_share(notes, every[every["split"] == "test"], category)
    return res


def category_only(queries, targets, pool, category, ks=(1, 5, 10)) -> dict:
    """What knowing the category and nothing else scores under the paper protocol: pool notes of the
    query's category first, all tied, the rest after them, all tied; Recall@K and MRR are expectations
    over random tie-breaking (g notes above the target, e tied with it: R@K = clip((K - g) / (e + 1), 0, 1),
    RR = the mean of 1 / (g + j + 1) over j = 0..e). Where it is near 1, a model cannot show more than
    category knowledge; the evaluation's own category-oracle row is the reference once it exists."""
    import numpy as np

    per_cat: dict = {}
    for p in pool:
        per_cat[category.get(p)] = per_cat.get(category.get(p), 0) + 1
    rec = {k: [] for k in ks}
    rr, same = [], []
    for q, t in zip(queries, targets):
        c = per_cat.get(category.get(q), 0)
        g, e = (0, c - 1) if category.get(t) == category.get(q) else (c, len(pool) - c - 1)
        same.append(c)
        for k in ks:
            rec[k].append(min(1.0, max(0.0, (k - g) / (e + 1))))
        rr.append(float(np.mean(1.0 / (g + np.arange(e + 1) + 1))))
    return {"pool_notes_in_the_query_category_median": float(np.median(same)),
            "category_only": {**{f"R@{k}": round(float(np.mean(v)), 4) for k, v in rec.items()},
                              "MRR": round(float(np.mean(rr)), 4)}}


def colour_share(notes, test_pairs, category) -> dict:
    """How many test pairs join a query to one of its 5 colour-nearest notes of its category (the
    simulated views' visual rule), against the chance of a random note of the category."""
    from notellm2.data_shards.catalog.synthetic import VISUAL_NEIGHBOURS, visual_neighbour_table

    table = visual_neighbour_table(notes, VISUAL_NEIGHBOURS)
    hits = chance = n = 0
    for q, t in zip(test_pairs["query_id"], test_pairs["target_id"]):
        near = table.get(category.get(q) or "", {}).get(q)
        if near is None or category.get(q) != category.get(t):
            continue
        n += 1
        hits += t in near
        chance += len(near) / max(1, len(table[category.get(q) or ""]) - 1)
    return {"same_category_pairs_with_histograms": n, "target_among_query_5_nearest": round(hits / max(1, n), 4),
            "chance": round(chance / max(1, n), 4)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="output folder (e.g. /work/bench_data, outside the repository)")
    ap.add_argument("--root", default="/usr/share/openclipart", help="the openclipart packages' folder")
    ap.add_argument("--min-per-category", type=int, default=20)
    ap.add_argument("--max-per-category", type=int, default=100)
    ap.add_argument("--blank-text-fraction", type=float, default=0.5)
    ap.add_argument("--users", type=int, default=6000)
    ap.add_argument("--visual-browsing", type=float, default=0.5)
    ap.add_argument("--val-fraction", type=float, default=0.15)
    ap.add_argument("--image-size", type=int, default=260)
    ap.add_argument("--seed", type=int, default=0, help="seed of the blanking, the views and the split")
    ap.add_argument("--towers", nargs="*", default=list(TOWERS), choices=list(TOWERS))
    ap.add_argument("--no-validate", dest="validate", action="store_false",
                    help="skip `data validate` (it decodes every image)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    summary = build(args.out, args)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
