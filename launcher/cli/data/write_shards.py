"""`notellm2 data write-shards`: pairs + catalog -> WebDataset tar shards (layout: docs/data.md)."""
from __future__ import annotations

import logging
import os
import sys

from notellm2.data_shards.config import MAX_IMAGE_PIXELS
from notellm2.launcher.cli import int_at_least, positive_int


def register(sub) -> None:
    p = sub.add_parser("write-shards", help="write pair shards and notes shards from mined pairs and a catalog")
    p.add_argument("--pairs", required=True, help="output dir of `notellm2 data mine-pairs` (pairs.parquet)")
    p.add_argument("--catalog", required=True, help="notes.jsonl or notes.csv")
    p.add_argument("--image-root", default=None, help="folder for relative image paths (default: the catalog's folder)")
    p.add_argument("--catalog-format", choices=["jsonl", "csv"], default=None)
    p.add_argument("--out", required=True, help="shard directory (created; one holding a complete set of other inputs "
                                                "or settings needs --overwrite; of the same ones, nothing is done)")
    p.add_argument("--shard-size", type=positive_int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--image-size", type=positive_int, default=256,
                   help="larger images are scaled down to this shorter side (default 256)")
    p.add_argument("--jpeg-quality", type=int_at_least(1), default=90, help="1..95 (default 90)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample order within each split")
    p.add_argument("--splits", default="train,val,test", help="comma-separated subset of train,val,test")
    p.add_argument("--bad-image-policy", choices=["drop_image", "skip_pair"], default="drop_image",
                   help="drop_image: write the note without image; skip_pair: skip its pairs")
    p.add_argument("--max-pixels", type=positive_int, default=MAX_IMAGE_PIXELS, help="larger source images count as bad")
    p.add_argument("--workers", type=positive_int, default=None,
                   help="processes re-encoding images (default: the cores this process may use)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a complete shard set of other inputs or settings in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=run)


def run(args) -> int:
    from notellm2.data_shards.writing.shards import ShardSettings, write_shards

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    splits = tuple(s.strip() for s in args.splits.split(",") if s.strip())
    settings = ShardSettings(shard_size=args.shard_size, image_size=args.image_size, jpeg_quality=args.jpeg_quality,
                             seed=args.seed, splits=splits, bad_image_policy=args.bad_image_policy,
                             max_image_pixels=args.max_pixels)
    # a ShardWriteError (the user's pairs, catalog or --out) is reported by notellm2.launcher.cli.main
    m = write_shards(args.pairs, args.catalog, args.out, image_root=args.image_root,
                     catalog_format=args.catalog_format, settings=settings, workers=args.workers,
                     overwrite=args.overwrite, progress=not args.no_progress)
    if m.get("unchanged"):
        print(f"{args.out}: already holds this shard set (same inputs and settings); nothing to do", file=sys.stderr)
    for split, c in m["counts"].items():
        print(f"{split}: {c['pairs_written']} pairs written of {c['pairs_in']} "
              f"(skipped: {c['missing_note_pairs']} missing note, {c['self_pairs']} self, "
              f"{c['duplicate_pairs']} duplicate"
              + (f", {c['bad_image_pairs']} bad image" if settings.bad_image_policy == 'skip_pair' else "")
              + f"); {c['notes_written']} notes ({c['notes_with_image']} with image)")
    for name, p in m["problems"].items():
        if p["count"]:
            print(f"{name}: {p['count']} (first: {', '.join(p['first'])}; every one in "
                  f"{os.path.join(args.out, m.get('problem_log') or 'problems.jsonl')})")
    for key, pattern in m["patterns"].items():
        if pattern:
            print(f"{key}: {os.path.join(args.out, pattern)}")
    print(f"manifest: {os.path.join(args.out, 'manifest.json')} ({len(m['shards'])} shards)")
    return 0
