#!/usr/bin/env python
"""How often would `loss.mask_known_positives` mask anything? Draws global batches of B training pairs
uniformly (without replacement within a batch) and counts, for every anchor row of [queries; targets],
the other columns whose note is one of the anchor's known related notes (`note_stats.parquet`'s
`known`) other than its own partner and other than a copy of itself or its partner (those the loss
excludes anyway). Ends with one `RESULT {json}` line.

    python scripts/known_positive_rate.py --pairs artifacts/demo/pairs \
        --note-stats artifacts/demo/shards/note_stats.parquet --batch 16 --draws 2000
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def masked_per_anchor(q: np.ndarray, t: np.ndarray, known: dict, batch: int, draws: int, seed: int = 0) -> np.ndarray:
    """For `draws` batches of `batch` pairs: the number of masked columns of every anchor row."""
    rng = np.random.default_rng(seed)
    out = np.empty((draws, 2 * batch), dtype=np.int64)
    for d in range(draws):
        idx = rng.choice(len(q), batch, replace=False)
        ids = np.concatenate([q[idx], t[idx]])
        partner = np.concatenate([t[idx], q[idx]])
        for i in range(2 * batch):
            mine = known.get(ids[i], ())
            out[d, i] = sum(1 for j in range(2 * batch)
                            if j != i and ids[j] not in (ids[i], partner[i]) and ids[j] in mine)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", required=True, help="the pairs directory (notellm2 data mine-pairs / import-pairs)")
    ap.add_argument("--note-stats", required=True, help="note_stats.parquet (written beside the shards)")
    ap.add_argument("--batch", type=int, default=16, help="pairs per global batch (pairs_per_rank x ranks)")
    ap.add_argument("--draws", type=int, default=2000)
    args = ap.parse_args(argv)

    import pandas as pd

    from notellm2.data_shards.mining.pairs_file import read_pairs

    stats = pd.read_parquet(args.note_stats, columns=["note_id", "known"])
    known = {row.note_id: set(row.known) for row in stats.itertuples()}
    pairs = read_pairs(args.pairs, split="train", columns=["query_id", "target_id"])
    q, t = pairs["query_id"].to_numpy(), pairs["target_id"].to_numpy()
    if len(q) < args.batch:
        sys.exit(f"{args.pairs}: {len(q)} training pairs, fewer than --batch {args.batch}")
    m = masked_per_anchor(q, t, known, args.batch, args.draws)
    share = float((m > 0).mean())
    print(f"batches of {args.batch} pairs ({args.draws} draws): {share:.1%} of anchors have a known positive among "
          f"their {2 * args.batch - 2} other columns; {m.mean():.3f} masked columns per anchor")
    print("RESULT " + json.dumps({"batch": args.batch, "draws": args.draws, "anchors_with_masked": round(share, 4),
                                  "masked_per_anchor": round(float(m.mean()), 4), "train_pairs": int(len(q))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
