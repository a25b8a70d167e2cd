#!/usr/bin/env python
"""The verdicts of the pre-registered checks C1-C6 (docs/results.md section 0, issue #26 item 5), from the
ladder's kept test reports and the reference rows' report, by the rule written down before the ladder ran:

- for each check and each seed, the paired bootstrap of MRR (run minus comparison) over the test queries
  both scored, on the check's subset (`notellm2.launcher.eval.evaluate.paired_runs`, the same bootstrap as
  `notellm2 eval --baseline`: its resamples, seed and level are the reports' own);
- *confirmed* when the 95 % interval excludes 0 in the claimed direction in at least 2 of the 3 seeds,
  *refuted* when it excludes 0 in the other direction in at least 2 of the 3, otherwise *inconclusive*;
- a reference row (the frozen tower's features, BM25, the category oracle) has no seed: its one run is
  paired with each seed of the trained run;
- C6 is the control: its differences are reported, with no claim and no verdict.

Pre-registration: a comparison is scored only once every seed of both sides has its report. Until then
it is listed as pending with the seeds that exist, and no figure of it is printed.

    python scripts/verdicts.py                       # docs/ladder/bench/*.test.json + docs/ladder/references/bench.test.json
    python scripts/verdicts.py --out docs/ladder/bench/verdicts.md
"""
from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from notellm2.launcher.eval.evaluate import paired_runs  # noqa: E402

SEEDS = (0, 1, 2)
REFERENCES = {"tower": "frozen tower features", "bm25": "BM25", "category": "category oracle"}
# (check, claim, run, comparison, subset, direction: +1 run above comparison, -1 below, 0 no claim)
CHECKS = [
    ("C1", "visual neglect", "basic_mm", "tower", "text_poor", -1),
    ("C2", "mICL lifts text-poor recall", "micl", "basic_mm", "text_poor", +1),
    ("C3", "late fusion lifts text-poor recall", "late_fusion", "basic_mm", "text_poor", +1),
    *[("C4a", "NoteLLM-2 best overall", "notellm2", other, "all", +1)
      for other in ("text_only", "basic_mm", "micl", "late_fusion", "two_tower")],
    *[("C4b", "NoteLLM-2 best on text-poor", "notellm2", other, "text_poor", +1)
      for other in ("text_only", "basic_mm", "micl", "late_fusion", "two_tower")],
    ("C5", "a larger frozen tower helps", "notellm2_lite2", "notellm2", "all", +1),
    ("C5", "a larger frozen tower helps", "notellm2_lite2", "notellm2", "text_poor", +1),
    ("C6", "control (no claim)", "notellm2", "text_only", "text_rich", 0),
    ("C6", "control (no claim)", "basic_mm", "text_only", "text_rich", 0),
]
# Comparisons written after the checks' verdicts were read, against the model-free rows: reported with the
# same paired intervals, never given a verdict (they were not registered before the ladder ran).
AFTER = [
    ("A1", "trained vs the tower alone", "notellm2", "tower", "all", 0),
    ("A2", "trained vs the tower alone", "notellm2", "tower", "text_poor", 0),
    ("A3", "trained vs the tower alone", "late_fusion", "tower", "text_poor", 0),
    ("A4", "trained vs term matching", "notellm2", "bm25", "text_rich", 0),
    ("A5", "trained vs term matching", "text_only", "bm25", "text_rich", 0),
]
AFTER_LABEL = "reported (not pre-registered)"


def load_tests(results: str) -> tuple[dict, dict]:
    """({(variant, seed): the report's full-input run}, the eval settings {ties, bootstrap}) of every kept test report."""
    runs, settings = {}, {}
    for f in sorted(os.listdir(results)):
        if not f.endswith(".test.json"):
            continue
        path = os.path.join(results, f)
        with open(path) as fh:
            rep = json.load(fh)
        try:
            both = [r for r in rep["eval"]["runs"] if ":" not in r["name"]]
            key = (rep["variant"], int(rep["seed"]))
            settings.setdefault(key, {"ties": rep["eval"].get("ties", "fair"), "bootstrap": rep["eval"]["bootstrap"]})
        except (KeyError, TypeError, ValueError) as e:
            raise SystemExit(f"verdicts.py: error: {path}: not a ladder test report ({e!r})") from None
        if both and "queries" in both[0]:
            runs[key] = both[0]
    return runs, settings


def load_references(path: str) -> tuple[dict, dict]:
    with open(path) as fh:
        rep = json.load(fh)
    return {r["name"]: r for r in rep["runs"]}, {"ties": rep.get("ties", "fair"), "bootstrap": rep["bootstrap"]}


def paired_mrr(base: dict, run: dict, settings: dict, subset: str) -> tuple[float, list[float], int] | None:
    """(MRR difference run - base, its interval, queries) on `subset`; None when the subset is empty."""
    rep = {"runs": [{**base, "name": "base"}, {**run, "name": "run"}], **settings}
    cell = paired_runs(rep, "base")["runs"][0]["subsets"].get(subset)
    if cell is None:
        return None
    return cell["mrr"]["diff"], cell["mrr"]["ci"], cell["n"]


def verdict(cis: list[list[float]], direction: int, no_claim: str = "control (no claim)") -> str:
    if direction == 0:
        return no_claim
    above = sum(lo > 0 for lo, _ in cis)
    below = sum(hi < 0 for _, hi in cis)
    agree, against = (above, below) if direction > 0 else (below, above)
    if agree >= 2:
        return "confirmed"
    if against >= 2:
        return "refuted"
    return "inconclusive"


def evaluate_checks(tests: dict, settings: dict, refs: dict, ref_settings: dict, seeds=SEEDS,
                    checks=CHECKS, no_claim: str = "control (no claim)") -> list[dict]:
    """Each of `checks` scored by the rule; a row with no claimed direction is labelled `no_claim`."""
    rows = []
    for check, claim, run_v, base_v, subset, direction in checks:
        row = {"check": check, "claim": claim, "run": run_v, "comparison": base_v, "subset": subset,
               "direction": direction, "seeds": {}, "verdict": None}
        have_run = [s for s in seeds if (run_v, s) in tests]
        have_base = list(seeds) if base_v in refs else [s for s in seeds if (base_v, s) in tests]
        if len(have_run) < len(seeds) or len(have_base) < len(seeds):
            row["verdict"] = "pending"
            base_has = "a reference" if base_v in refs else f"seeds {have_base or 'none'}"
            row["pending"] = f"{run_v} seeds {have_run or 'none'}, {base_v} {base_has} (needs seeds {list(seeds)})"
            rows.append(row)
            continue
        for s in seeds:
            base = refs[base_v] if base_v in refs else tests[(base_v, s)]
            row["seeds"][s] = paired_mrr(base, tests[(run_v, s)], settings[(run_v, s)], subset)
        scored = [v for v in row["seeds"].values() if v is not None]
        row["verdict"] = verdict([v[1] for v in scored], direction, no_claim) if len(scored) == len(seeds) else "n/a (empty subset)"
        rows.append(row)
    return rows


def _table(rows: list[dict], seeds=SEEDS) -> list[str]:
    sign = {1: ">", -1: "<", 0: "vs"}
    lines = ["| check | claim | run | comparison | subset | " + " | ".join(f"seed {s}" for s in seeds) + " | verdict |",
             "|---" * (6 + len(seeds)) + "|"]
    for r in rows:
        comp = REFERENCES.get(r["comparison"], r["comparison"])
        head = f"| {r['check']} | {r['claim']} | {r['run']} {sign[r['direction']]} | {comp} | {r['subset']} | "
        if r["verdict"] == "pending":
            lines.append(head + " | ".join("-" for _ in seeds) + f" | pending: {r['pending']} |")
            continue
        cells = []
        for s in seeds:
            v = r["seeds"].get(s)
            cells.append("n/a" if v is None else f"{v[0]:+.3f} [{v[1][0]:+.3f}, {v[1][1]:+.3f}] (n {v[2]})")
        lines.append(head + " | ".join(cells) + f" | **{r['verdict']}** |")
    return lines


def to_markdown(rows: list[dict], seeds=SEEDS, after: list[dict] | None = None) -> str:
    lines = ["# Pre-registered checks: verdicts (generated by scripts/verdicts.py; do not edit by hand)", "",
             "MRR difference (run minus comparison) with its 95 % paired bootstrap interval over test queries, per "
             "seed; rule in docs/results.md section 0. A reference row is paired with each seed.", "",
             *_table(rows, seeds)]
    if after:
        lines += ["", "## After the verdicts: the trained runs against the model-free rows", "",
                  "Written once the checks above had been read, so these rows carry no verdict: the same paired "
                  "intervals, reported only.", "", *_table(after, seeds)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=os.path.join(REPO, "docs", "ladder", "bench"),
                    help="the ladder's kept reports (NAME.test.json)")
    ap.add_argument("--references", default=os.path.join(REPO, "docs", "ladder", "references", "bench.test.json"),
                    help="the eval report of the reference rows (tower, bm25, category) on test")
    ap.add_argument("--out", default=None, help="also write the table here (markdown)")
    args = ap.parse_args(argv)
    tests, settings = load_tests(args.results)
    refs, ref_settings = load_references(args.references)
    rows = evaluate_checks(tests, settings, refs, ref_settings)
    after = evaluate_checks(tests, settings, refs, ref_settings, checks=AFTER, no_claim=AFTER_LABEL)
    text = to_markdown(rows, after=after)
    print(text, end="")
    if args.out:
        with open(args.out + ".tmp", "w") as fh:
            fh.write(text)
        os.replace(args.out + ".tmp", args.out)
    counts = {v: sum(r["verdict"] == v for r in rows) for v in dict.fromkeys(r["verdict"] for r in rows)}
    print("RESULT " + json.dumps({"name": "verdicts", "counts": counts,
                                  "rows": [{k: r[k] for k in ("check", "run", "comparison", "subset", "verdict")}
                                           for r in rows]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
