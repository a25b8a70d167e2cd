#!/usr/bin/env python
"""Does run A beat run B? The paired bootstrap over the paper protocol's queries of Recall@K(A) - Recall@K(B).

    python scripts/paired_diff.py --pairs A/pairs --a A/emb_trained --b A/emb_minilm --k 10 50 100

Both runs are ranked on the same queries and pool (notellm2.launcher.eval.evaluate.paper_task on the test split);
the same resampled query sets (1000 draws, seed 0) score both, so the interval is that of the
difference, narrower than the two runs' own intervals suggest. One `RESULT {json}` line at the end."""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def paired_difference(pairs_dir: str, a: str, b: str, ks=(10, 50, 100), split: str = "test",
                      resamples: int = 1000) -> dict:
    """{K: {"diff": mean, "ci": [lo, hi]}} of Recall@K(a) - Recall@K(b), and the number of queries."""
    from notellm2.data_shards.mining.pairs_file import read_note_split, read_pairs
    from notellm2.launcher.eval.evaluate import load_embeddings, paper_task, rank_run

    pairs = read_pairs(pairs_dir, split=split, columns=["query_id", "target_id"])
    notes = read_note_split(pairs_dir)
    task = paper_task(list(zip(pairs["query_id"], pairs["target_id"])),
                      notes.loc[notes["split"] == split, "note_id"].tolist())
    ranks = [rank_run(task, *load_embeddings(str(d))).ranks for d in (a, b)]
    draws = np.random.default_rng(0).integers(0, len(ranks[0]), size=(resamples, len(ranks[0])))
    out = {}
    for k in ks:
        diff = (ranks[0] < k).astype(float) - (ranks[1] < k).astype(float)
        lo, hi = np.percentile(diff[draws].mean(axis=1), [2.5, 97.5])
        out[k] = {"diff": float(diff.mean()), "ci": [float(lo), float(hi)]}
    return {"queries": len(ranks[0]), "diff": out}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", required=True)
    ap.add_argument("--a", required=True)
    ap.add_argument("--b", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--k", type=int, nargs="+", default=[10, 50, 100])
    ap.add_argument("--resamples", type=int, default=1000)
    args = ap.parse_args(argv)
    res = paired_difference(args.pairs, args.a, args.b, args.k, args.split, args.resamples)
    for k, d in res["diff"].items():
        print(f"R@{k}: A - B = {d['diff']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] over {res['queries']} queries")
    print("RESULT " + json.dumps({"a": args.a, "b": args.b, **res}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
