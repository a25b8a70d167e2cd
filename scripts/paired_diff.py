#!/usr/bin/env python
"""Does run A beat run B? The paired bootstrap over queries of A minus B: a thin wrapper of
`notellm2 eval --baseline` (notellm2.launcher.eval.evaluate.paired_runs, the evaluation's one bootstrap).

    python scripts/paired_diff.py --pairs A/pairs --a A/emb_trained --b A/emb_minilm --k 10 50 100
    python scripts/paired_diff.py --report A/eval/eval.json --a notellm2 --b minilm_zero_shot

The first form ranks both embedding folders on the paper protocol's test queries and pool; the second
reads a saved eval report (its per-query counts), so no embedding is read again. Ties follow the
report (`fair` by default). One `RESULT {json}` line at the end."""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _result(paired: dict, ks) -> dict:
    run = paired["runs"][0]
    allq = run["subsets"]["all"]
    return {"queries": run["n"], "ties": paired["ties"],
            "diff": {int(k): allq["recall"][str(k)] for k in ks if str(k) in allq["recall"]},
            "mrr": allq["mrr"]}


def paired_difference(pairs_dir: str, a: str, b: str, ks=(10, 50, 100), split: str = "test",
                      resamples: int = 1000, ties: str = "fair") -> dict:
    """{"queries": n, "diff": {K: {"diff": mean, "ci": [lo, hi]}}, "mrr": {...}} of A - B."""
    from notellm2.data_shards.mining.pairs_file import read_note_split, read_pairs
    from notellm2.launcher.eval.evaluate import evaluate_runs, paper_task

    pairs = read_pairs(pairs_dir, split=split, columns=["query_id", "target_id"])
    notes = read_note_split(pairs_dir)
    task = paper_task(list(zip(pairs["query_id"], pairs["target_id"])),
                      notes.loc[notes["split"] == split, "note_id"].tolist())
    report = evaluate_runs([("b", str(b)), ("a", str(a))], task, ks=ks, resamples=resamples, ties=ties,
                           baseline="b", log=lambda m: None)
    return _result(report["paired"], ks)


def paired_from_report(path: str, a: str, b: str, ks=None) -> dict:
    """The same from a saved eval report: runs named `a` and `b`."""
    from notellm2.launcher.eval.evaluate import paired_runs

    with open(path) as fh:
        report = json.load(fh)
    report = {**report, "runs": [r for r in report["runs"] if r["name"] in (a, b)]}
    paired = paired_runs(report, b)
    if not paired["runs"]:
        raise SystemExit(f"{path}: no run named {a!r}")
    return _result(paired, ks or paired["runs"][0]["ks"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--pairs", help="the mined pairs folder (rank --a and --b, embedding folders)")
    src.add_argument("--report", help="an eval.json (--a and --b are run names in it)")
    ap.add_argument("--a", required=True)
    ap.add_argument("--b", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--k", type=int, nargs="+", default=[10, 50, 100])
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--ties", default="fair", choices=["fair", "pessimistic"])
    args = ap.parse_args(argv)
    if args.report:
        res = paired_from_report(args.report, args.a, args.b, args.k)
    else:
        res = paired_difference(args.pairs, args.a, args.b, args.k, args.split, args.resamples, args.ties)
    for k, d in res["diff"].items():
        print(f"R@{k}: A - B = {d['diff']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] over {res['queries']} queries")
    m = res["mrr"]
    print(f"MRR: A - B = {m['diff']:+.3f} [{m['ci'][0]:+.3f}, {m['ci'][1]:+.3f}] (ties {res['ties']})")
    print("RESULT " + json.dumps({"a": args.a, "b": args.b, **res}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
