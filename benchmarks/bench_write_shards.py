"""Shard-writing throughput: N re-encoding workers against 1 worker, measured in the same run.

    .venv/bin/python benchmarks/bench_write_shards.py                 # synthetic 640 px catalog
    .venv/bin/python benchmarks/bench_write_shards.py --catalog notes.jsonl --pairs pairs_dir

Runs are interleaved (1, N, 1, N, ...) and the best wall time of each is kept, which damps the
noise of a shared machine. Every run must produce byte-identical shards (checked and reported).
Ends with one line: RESULT {json}.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from notellm2.data_shards.catalog.synthetic import make_synthetic_catalog, make_synthetic_pairs  # noqa: E402
from notellm2.data_shards.writing.shards import ShardSettings, write_shards  # noqa: E402


def _digest(out_dir: str) -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(out_dir)):
        h.update(name.encode())
        with open(os.path.join(out_dir, name), "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--catalog", help="a catalog to use instead of the synthetic one")
    ap.add_argument("--pairs", help="its pairs dir (default: synthetic same-category pairs)")
    ap.add_argument("--notes", type=int, default=400, help="synthetic notes")
    ap.add_argument("--source-size", type=int, default=640, help="synthetic source image side (px)")
    ap.add_argument("--n-pairs", type=int, default=800)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--target", type=float, default=1.3, help="required speed-up of --workers over 1 worker")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="bench_shards_")
    try:
        catalog = args.catalog or make_synthetic_catalog(os.path.join(tmp, "cat"), n_notes=args.notes,
                                                         n_categories=8, image_size=args.source_size)
        pairs = args.pairs or make_synthetic_pairs(catalog, os.path.join(tmp, "pairs"), n_pairs=args.n_pairs)
        best = {1: float("inf"), args.workers: float("inf")}
        digests, images = set(), 0
        for r in range(args.repeats):
            for w in (1, args.workers):
                out = os.path.join(tmp, f"out-{w}-{r}")
                t0 = time.perf_counter()
                m = write_shards(pairs, catalog, out, settings=ShardSettings(), workers=w)
                dt = time.perf_counter() - t0
                best[w] = min(best[w], dt)
                images = m["sources"]["images"]["read"]
                digests.add(_digest(out))
                shutil.rmtree(out)
                print(f"run {r} workers={w}: {dt:.2f} s ({images / dt:.1f} images/s)", flush=True)
        base = images / best[1]
        fig = images / best[args.workers]
        ratio = fig / base
        identical = len(digests) == 1
        print(f"{images} distinct images re-encoded; best of {args.repeats}: 1 worker {base:.1f} images/s, "
              f"{args.workers} workers {fig:.1f} images/s, speed-up {ratio:.2f} (target >= {args.target}); "
              f"outputs byte-identical across all runs: {identical}")
        result = {"name": f"write_shards_images_per_s_{args.workers}_workers", "figure": round(fig, 2),
                  "bound_or_baseline": round(base, 2), "ratio": round(ratio, 3), "target": args.target,
                  "pass": bool(ratio >= args.target and identical)}
        print("RESULT " + json.dumps(result))
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
