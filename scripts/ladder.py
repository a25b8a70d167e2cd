#!/usr/bin/env python
"""The benchmark ladder (issue #26 item 5) on the benchmark catalog (scripts/bench_catalog.py,
docs/benchmark.md): learning rates chosen once on val, then 3 seeds of each variant on test.

    python scripts/ladder.py --root /work/exp/bench --data /work/bench_data --plan   # what would run, and how
    python scripts/ladder.py --root /work/exp/bench --data /work/bench_data          # run (idempotent, resumable)
    python scripts/ladder.py --root /work/exp/bench --only notellm2 two_tower         # some variants only
    python scripts/ladder.py --table-only                                             # rebuild the table

Phases, in order (each rung is `scripts/experiment.py`'s `run_experiment`; budget: configs/demo_cpu.yaml
as it is, 120 steps of 2 ranks x 8 pairs, with `model.variant=V train.seed=S data.seed=S`; the two-tower is
configs/minilm_two_tower.yaml with the same steps, batch, seed and loss):

1. grid (val, seed 0): `text_only`, `basic_mm`, `notellm2` and the two-tower at `train.lr_llm` in
   {5e-5, 1e-4, 2e-4} with `train.lr_new` = 2 x lr_llm.
2. followers (val, seed 0): `micl` and `late_fusion` sit between `basic_mm` and `notellm2` (notellm2 =
   mICL + late fusion), so each runs at `basic_mm`'s best and at `notellm2`'s best learning rate (once
   when they are the same) and keeps the better.
3. test (seeds 0, 1, 2): the six variants at their chosen learning rate, each with its probes, and
   `notellm2_lite2`: notellm2 at its chosen learning rate with the larger frozen tower
   (EfficientNet-Lite2, 260 px; not tuned separately). Beside them the zero-shot MiniLM.

4. causes (val, seed 0; issue #26 item 6, why mICL costs recall): `notellm2` at its chosen learning rate
   with one change each (CAUSES): no visual loss, a 3x heavier visual loss, the connector and heads at
   1x and at 5x the LLM's rate instead of 2x, and the authors' gate and head initialisation (no bias,
   Xavier-normal gate, N(0, 0.02) head). Each is paired with the grid's `notellm2` run of that rate on val.

The best learning rate is the one with the highest val MRR on all queries (Recall@10 where the eval
report has no MRR); ties go to the smaller rate. Evaluation reports K = 1, 5, 10 (the category ceiling
is not reached there, docs/benchmark.md) and, with the fair eval, MRR and NDCG.

Each run trains in ROOT/<variant>_lr<lr>_s<seed>[...]; a test rung at seed 0 reuses the grid's training
of the same variant and rate (only the embedding and the evaluation of test are new). Runs of a variant
that sees images read the frozen tower's features from the data's vision cache
(DATA/vision_cache/lite0 or lite2, written by bench_catalog.py), so the tower never runs in the ladder.

Idempotent and resumable: a finished stage of a run is reused, an interrupted training resumes from its
checkpoint, and every finished evaluation's report (with its per-query records) is copied to --results
(default docs/ladder/bench/, committed) as NAME.SPLIT.json; a rung whose report is there, made with the
same config text, overrides, data and split, is not run again. The table (--results/ladder.md) is
rebuilt from those reports after every rung. `--plan` prints every rung, its state and its commands,
and runs nothing.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "scripts"))

from bench_catalog import TOWERS  # noqa: E402
from experiment import plan_experiment, run_experiment  # noqa: E402

DEMO = "configs/demo_cpu.yaml"
TWO_TOWER = "configs/minilm_two_tower.yaml"
TUNED = ("text_only", "basic_mm", "notellm2", "two_tower")
FOLLOWERS = {"micl": ("basic_mm", "notellm2"), "late_fusion": ("basic_mm", "notellm2")}
TESTED = ("notellm2", "text_only", "basic_mm", "micl", "late_fusion", "two_tower", "notellm2_lite2")
BORROWS = {"notellm2_lite2": "notellm2"}  # takes this variant's learning rate
LRS = (5e-5, 1e-4, 2e-4)
SEEDS = (0, 1, 2)
PROBES = ("both", "text", "image")
KS = (1, 5, 10)
PHASES = ("grid", "followers", "test", "causes")
# Item 6's cause tests: tag -> overrides on top of `notellm2` at its chosen rate (lr_new is replaced where given;
# `{lr}` is the LLM's rate). The visual loss weight is micl_weight_vis / (micl_weight_mm + micl_weight_vis): 0.1 today.
CAUSES = {
    "visw0": ["loss.micl_weight_vis=0.0"],
    "visw3": ["loss.micl_weight_mm=7.0", "loss.micl_weight_vis=3.0"],
    "newlr1x": ["train.lr_new={lr}"],
    "newlr5x": ["train.lr_new={lr5}"],
    "paperinit": ["model.fusion.bias=false", "model.fusion.init=xavier_normal", "model.head.bias=false",
                  "model.head.init=normal", "model.head.init_std=0.02"],
}
SUBSETS = ("all", "text_poor")  # table columns (a subset the eval report lacks shows "-")


def lr_tag(lr: float) -> str:
    return f"{lr:.0e}"  # 5e-05, 1e-04, 2e-04


def rung(variant: str, lr: float, seed: int, split: str, probes=PROBES) -> dict:
    """One run of `variant` at learning rate `lr` and `seed`, evaluated on `split`."""
    lrs = [f"train.lr_llm={lr:.1e}", f"train.lr_new={2 * lr:.1e}"]
    seeds = [f"train.seed={seed}", f"data.seed={seed}"]
    if variant == "two_tower":
        config, ov, tower = TWO_TOWER, [*seeds, *lrs], None
    elif variant == "notellm2_lite2":
        config, ov, tower = DEMO, ["model.variant=notellm2", *seeds, *lrs, *TOWERS["lite2"]], "lite2"
    else:
        from notellm2.modeling.names import probe_unavailable

        sees_images = not probe_unavailable(variant, "image")
        config, ov, tower = DEMO, [f"model.variant={variant}", *seeds, *lrs], "lite0" if sees_images else None
    return dict(name=f"{variant}_lr{lr_tag(lr)}_s{seed}", variant=variant, lr=lr, seed=seed, split=split,
                config=config, overrides=ov, tower=tower, untrained=False, probes=tuple(probes))


def cause_rung(tag: str, lr: float) -> dict:
    """`notellm2` at `lr`, val, seed 0, with the one change CAUSES[tag]; probes both and image."""
    r = rung("notellm2", lr, 0, "val", ("both", "image"))
    extra = [o.format(lr=f"{lr:.1e}", lr5=f"{5 * lr:.1e}") for o in CAUSES[tag]]
    replaced = {o.split("=", 1)[0] for o in extra}
    r["overrides"] = [o for o in r["overrides"] if o.split("=", 1)[0] not in replaced] + extra
    r["name"] = f"notellm2_{tag}_lr{lr_tag(lr)}_s0"
    r["cause"] = tag
    return r


def baselines() -> list[dict]:
    return [dict(name="minilm_zero_shot", variant="minilm_zero_shot", lr=None, seed=0, split="test", config=TWO_TOWER,
                 overrides=["train.seed=0"], tower=None, untrained=True, probes=("both",))]


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


def budget_key(r: dict, data_fp: str) -> str:
    """What makes two reports of a rung comparable: the config file's text, the overrides, the data, the split."""
    text = open(os.path.join(REPO, r["config"])).read()
    payload = json.dumps([text, r["overrides"], r["untrained"], data_fp, r["split"]], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def report_path(results: str, r: dict) -> str:
    return os.path.join(results, f"{r['name']}.{r['split']}.json")


def kept_report(results: str, r: dict, data_fp: str | None) -> dict | None:
    """The kept report of rung `r` if it was made with this budget and data (any data when data_fp is None)."""
    path = report_path(results, r)
    if not os.path.exists(path):
        return None
    rep = json.load(open(path))
    if data_fp is not None and rep.get("budget_key") != budget_key(r, data_fp):
        return None
    return rep


def score(rep: dict) -> float:
    """The selection figure of a val report: MRR over all queries, or Recall@10 without MRR."""
    sub = rep["eval"]["runs"][0]["subsets"]["all"]
    return float(sub["mrr"]) if "mrr" in sub else float(sub["recall"]["10"])


def choose(candidates: list[dict], results: str, data_fp: str | None) -> tuple[float | None, list]:
    """(best learning rate, [(lr, score or None)]) over grid rungs; None while one of them has no report."""
    scored = []
    for r in candidates:
        rep = kept_report(results, r, data_fp)
        scored.append((r["lr"], score(rep) if rep else None))
    if not scored or any(s is None for _, s in scored):
        return None, scored
    best = max(scored, key=lambda x: (x[1], -x[0]))
    return best[0], scored


def phases(seeds, results: str, data_fp: str | None) -> list[tuple[str, list[dict], list[str]]]:
    """[(phase, rungs, notes)]: the rungs are known as far as the kept val reports decide them; a rung
    whose learning rate is not decided yet is listed in notes as pending."""
    grid = [rung(v, lr, 0, "val", ("both",)) for v in TUNED for lr in LRS]
    best = {v: choose([r for r in grid if r["variant"] == v], results, data_fp)[0] for v in TUNED}
    followers, notes = [], []
    for v, leaders in FOLLOWERS.items():
        if any(best[x] is None for x in leaders):
            notes.append(f"{v}: pending (waits for the grid of {' and '.join(leaders)})")
            continue
        cands = sorted({best[x] for x in leaders})
        if len(cands) == 1:
            best[v] = cands[0]  # both leaders chose the same rate: nothing to compare
            continue
        rs = [rung(v, lr, 0, "val", ("both",)) for lr in cands]
        followers += rs
        best[v] = choose(rs, results, data_fp)[0]
    for v, src in BORROWS.items():
        best[v] = best.get(src)
    test = []
    for s in seeds:
        for v in TESTED:
            if best.get(v) is None:
                if s == seeds[0]:
                    notes.append(f"{v}: test runs pending (learning rate not chosen yet)")
                continue
            test.append(rung(v, best[v], s, "test"))
    causes = [cause_rung(tag, best["notellm2"]) for tag in CAUSES] if best.get("notellm2") is not None else []
    return [("grid", grid, []), ("followers", followers, [n for n in notes if "grid of" in n]),
            ("test", test + baselines(), [n for n in notes if "test runs" in n]),
            ("causes", causes, [] if causes else ["causes: pending (notellm2's learning rate not chosen yet)"])]


def ensure_data(data: str) -> None:
    if os.path.exists(os.path.join(data, "shards", "manifest.json")):
        return
    import subprocess

    print(f"[ladder] building the benchmark catalog in {data}", flush=True)
    subprocess.check_call([sys.executable, os.path.join(REPO, "scripts", "bench_catalog.py"), data], cwd=REPO)


def ensure_models() -> None:
    """The configs' pretrained models (artifacts/models: SmolLM2-135M, all-MiniLM-L6-v2; idempotent)."""
    import subprocess

    subprocess.check_call([sys.executable, os.path.join(REPO, "scripts", "prepare_models.py"), "--out",
                           os.path.join(REPO, "artifacts", "models")], cwd=REPO)


def _experiment_args(r: dict, root: str, data: str) -> dict:
    d = os.path.abspath(data)
    return dict(name=r["name"], root=root, data=d, config=r["config"], split=r["split"], nproc=2, ks=KS,
                untrained=r["untrained"], repo=REPO, overrides=r["overrides"], probes=r["probes"], protocol="paper",
                catalog=os.path.join(d, "catalog.jsonl"),
                vision_cache=os.path.join(d, "vision_cache", r["tower"]) if r["tower"] else None)


def keep(results: str, r: dict, res: dict, key: str, fp: str) -> None:
    small = {"name": r["name"], "split": r["split"], "config": r["config"], "overrides": r["overrides"],
             "untrained": r["untrained"], "variant": r["variant"], "lr": r["lr"], "seed": r["seed"],
             "tower": r["tower"], "cause": r.get("cause"), "budget_key": key, "data": fp, "times": res["times"],
             "eval": {k: v for k, v in res.items() if k not in ("name", "config", "overrides", "untrained", "split",
                                                                 "variant", "times")}}
    for run in small["eval"].get("runs", []):
        run.pop("embeddings", None)  # a path on the machine that ran it
    path = report_path(results, r)
    with open(path + ".tmp", "w") as fh:
        json.dump(small, fh, indent=1)
    os.replace(path + ".tmp", path)


def print_plan(seeds, root: str, data: str, results: str, fp: str | None, only=None, out=print,
               run_phases=PHASES) -> dict:
    """Every rung of every phase with its state (kept / to run / pending) and, for a rung to run, its commands."""
    counts = {"kept": 0, "to_run": 0, "trainings_to_run": 0}
    trainings = set()
    for phase, rs, notes in phases(seeds, results, fp):
        if phase not in run_phases:
            continue
        out(f"== {phase}")
        for r in rs:
            if only and not _selected(r, only):
                continue
            state = "kept" if fp is not None and kept_report(results, r, fp) else "to run"
            out(f"-- {r['name']} [{r['split']}] {r['config']} {' '.join(r['overrides'])}"
                f"{' (tower features: vision_cache/' + r['tower'] + ')' if r['tower'] else ''}: {state}")
            if state == "kept":
                counts["kept"] += 1
                continue
            counts["to_run"] += 1
            plan = plan_experiment(**_experiment_args(r, root, data))
            for step in plan["steps"]:
                if step["stage"] == "train" and not step["done"]:
                    trainings.add(plan["out"])
                out(f"   {step['stage']}{' (done)' if step['done'] else ''}: {' '.join(step['cmd'])}")
        for n in notes:
            out(f"-- {n}")
    counts["trainings_to_run"] = len(trainings)
    out(f"== {counts['to_run']} evaluations to run ({counts['trainings_to_run']} of them train), {counts['kept']} kept")
    return counts


def _selected(r: dict, only) -> bool:
    return any(o in (r["name"], r["variant"], r.get("cause")) for o in only)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", help="work folder: one sub-folder per run (runs, exports, embeddings)")
    ap.add_argument("--data", default=os.path.join(REPO, "artifacts", "bench"),
                    help="the benchmark catalog's folder (scripts/bench_catalog.py; built there when missing)")
    ap.add_argument("--results", default=os.path.join(REPO, "docs", "ladder", "bench"),
                    help="where finished reports are kept")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    ap.add_argument("--only", nargs="+", help="run names, variants or cause tags (e.g. notellm2 two_tower visw0)")
    ap.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES),
                    help="the phases to run, in the order given (default: all, in order)")
    ap.add_argument("--plan", action="store_true", help="print every rung, its state and its commands; run nothing")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args(argv)
    os.makedirs(args.results, exist_ok=True)
    if args.table_only:
        _write_table(args.results)
        return 0
    if not args.root:
        ap.error("--root is required (except with --table-only)")
    have_data = os.path.exists(os.path.join(args.data, "shards", "manifest.json"))
    if args.plan:
        if not have_data:
            print(f"[ladder] {args.data} holds no benchmark data yet: it is built first "
                  f"(scripts/bench_catalog.py {args.data}); kept reports cannot be matched to it")
        print_plan(args.seeds, args.root, args.data, args.results, data_fingerprint(args.data) if have_data else None,
                   args.only, run_phases=args.phases)
        return 0
    ensure_data(args.data)
    ensure_models()
    fp = data_fingerprint(args.data)
    for phase in args.phases:
        # recomputed per phase: the followers and the test runs depend on the reports just written
        rs, notes = {p: (r, n) for p, r, n in phases(args.seeds, args.results, fp)}[phase]
        for n in notes:
            print(f"[ladder] {phase}: {n}", flush=True)
        for r in rs:
            if args.only and not _selected(r, args.only):
                continue
            key = budget_key(r, fp)
            if kept_report(args.results, r, fp):
                print(f"[ladder] {r['name']} [{r['split']}]: done (kept report {report_path(args.results, r)})", flush=True)
                continue
            t0 = time.time()
            print(f"[ladder] {phase}: {r['name']} [{r['split']}] {' '.join(r['overrides'])} ({time.strftime('%H:%M:%S')})",
                  flush=True)
            res = run_experiment(**_experiment_args(r, args.root, args.data))
            keep(args.results, r, res, key, fp)
            print(f"[ladder] {r['name']} [{r['split']}]: finished in {time.time() - t0:.0f} s", flush=True)
            _write_table(args.results)
    _write_table(args.results)
    return 0


# ------------------------------------------------------------------------------------------ the table
def _fmt(value, ci=None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{value:.3f}"


def _cells(run: dict, subset: str) -> list[str]:
    sub = run["subsets"].get(subset)
    if not sub or "na" in sub:
        return ["n/a" if sub else "-"] * (len(KS) + 1)
    cells = [_fmt(sub["recall"].get(str(k)), sub.get("ci", {}).get(str(k))) for k in KS]
    return cells + [_fmt(sub.get("mrr"), sub.get("mrr_ci"))]


def _mean_spread(values: list[float], fmt: str = ".3f") -> str:
    if not values:
        return "-"
    m = sum(values) / len(values)
    return f"{m:{fmt}} ± {(max(values) - min(values)) / 2:{fmt}}" if len(values) > 1 else f"{m:{fmt}}"


def _figure(run: dict, subset: str, k) -> float | None:
    sub = run["subsets"].get(subset) or {}
    if "na" in sub:
        return None
    return sub.get("mrr") if k == "mrr" else sub.get("recall", {}).get(str(k))


def build_table(results: str) -> str:
    """ladder.md from every kept report: the learning-rate choice on val, every test run and probe with
    its intervals, then the mean ± half-range over seeds per variant and probe, with chance levels."""
    reports = [json.load(open(os.path.join(results, f))) for f in sorted(os.listdir(results))
               if f.endswith(".json") and f.count(".") == 2]
    if not reports:
        return ""
    val = [r for r in reports if r["split"] == "val" and not r.get("cause")]
    causes = [r for r in reports if r["split"] == "val" and r.get("cause")]
    test = [r for r in reports if r["split"] == "test"]
    head = [f"R@{k}" for k in KS] + ["MRR"]
    lines = ["# The benchmark ladder (generated by scripts/ladder.py; do not edit by hand)", "",
             "Data: scripts/bench_catalog.py (docs/benchmark.md). 95% bootstrap intervals over queries; "
             "`name:text` / `name:image` are the probes.", ""]
    if val:
        lines += ["## Learning rates (val, seed 0; lr_new = 2 x lr_llm)", "",
                  "| variant | lr_llm | " + " | ".join(f"all {h}" for h in head) + " | chosen |", "|---" * (len(head) + 3) + "|"]
        for variant in dict.fromkeys(r["variant"] for r in val):
            rs = sorted((r for r in val if r["variant"] == variant), key=lambda r: r["lr"])
            best = max(rs, key=lambda r: (score(r), -r["lr"]))
            for r in rs:
                lines.append(f"| {variant} | {r['lr']:.0e} | " + " | ".join(_cells(r["eval"]["runs"][0], "all")) +
                             f" | {'yes' if r is best else ''} |")
        lines.append("")
    if test:
        order = {v: i for i, v in enumerate(("minilm_zero_shot",) + TESTED)}
        test.sort(key=lambda r: (r["seed"], order.get(r["variant"], 99), r["name"]))
        stats = test[0]["eval"].get("protocol_stats", {})
        lines += ["## Test runs", "", "Protocol paper: " + ", ".join(f"{k} {v}" for k, v in stats.items()), ""]
        for subset in SUBSETS:
            lines += [f"### {subset}", "", "| run | " + " | ".join(head) + " | queries | pool |", "|---" * (len(head) + 3) + "|"]
            for r in test:
                for run in r["eval"]["runs"]:
                    n = (run["subsets"].get(subset) or {}).get("n", "-")
                    lines.append(f"| {run['name']} | " + " | ".join(_cells(run, subset)) + f" | {n} | {run['pool_size']} |")
            lines.append("")
        pool = test[0]["eval"]["runs"][0]["pool_size"]
        lines += [f"Chance (random encoder, pool {pool}): " + ", ".join(f"R@{k} {k / pool:.3f}" for k in KS), ""]
        lines += ["## Over seeds (mean ± half the range)", "",
                  "| variant | probe | seeds | lr_llm | " + " | ".join(f"all {h}" for h in head) +
                  " | " + " | ".join(f"text_poor {h}" for h in head) + " | train wall (s) |",
                  "|---" * (5 + 2 * len(head)) + "|"]
        groups: dict = {}
        for r in test:
            for run in r["eval"]["runs"]:
                probe = run["name"].split(":", 1)[1] if ":" in run["name"] else "both"
                g = groups.setdefault((r["variant"], probe), {"n": 0, "lr": r["lr"], "wall": [],
                                                              **{(s, k): [] for s in SUBSETS for k in (*KS, "mrr")}})
                g["n"] += 1
                for s in SUBSETS:
                    for k in (*KS, "mrr"):
                        v = _figure(run, s, k)
                        if v is not None:
                            g[(s, k)].append(v)
                if probe == "both" and "train_s" in r["times"]:
                    g["wall"].append(r["times"]["train_s"])
        for (variant, probe), g in groups.items():
            lines.append(f"| {variant} | {probe} | {g['n']} | {'-' if g['lr'] is None else format(g['lr'], '.0e')} | " +
                         " | ".join(_mean_spread(g[(s, k)]) for s in SUBSETS for k in (*KS, "mrr")) +
                         f" | {_mean_spread(g['wall'], '.0f')} |")
        lines.append("")
    if causes:
        lines += ["## Item 6: cause tests (val, seed 0; `notellm2` at its chosen rate, one change each)", "",
                  "| run | change | " + " | ".join(f"{s} {h}" for s in SUBSETS for h in head) + " |",
                  "|---" * (2 + len(SUBSETS) * len(head)) + "|"]
        for r in sorted(causes, key=lambda r: r["name"]):
            for run in r["eval"]["runs"]:
                base = rung("notellm2", r["lr"], 0, "val")["overrides"]
                change = " ".join(o for o in r["overrides"] if o not in base)
                lines.append(f"| {run['name']} | {change} | " + " | ".join(c for s in SUBSETS for c in _cells(run, s)) + " |")
        lines.append("")
    return "\n".join(lines)


def _write_table(results: str) -> None:
    table = build_table(results)
    if table:
        with open(os.path.join(results, "ladder.md.tmp"), "w") as fh:
            fh.write(table)
        os.replace(os.path.join(results, "ladder.md.tmp"), os.path.join(results, "ladder.md"))
        print(table, flush=True)


if __name__ == "__main__":
    sys.exit(main())
