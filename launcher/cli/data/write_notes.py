"""`notellm2 data write-notes`: a catalog of new or edited notes -> notes shards, without mined pairs,
with the day's deletions (docs/new_notes.md)."""
from __future__ import annotations

import logging
import os

from notellm2.data_shards.config import MAX_IMAGE_PIXELS


def register(sub) -> None:
    p = sub.add_parser("write-notes", help="write notes shards from a catalog alone (new or edited notes, no pairs), "
                                           "with the deletions")
    p.add_argument("--catalog", required=True, help="notes.jsonl or notes.csv: the new or edited notes (may be empty)")
    p.add_argument("--out", required=True, help="shard directory (created; one holding a complete earlier run needs "
                                                "--overwrite)")
    p.add_argument("--deleted", default=None, metavar="IDS.txt", help="note ids deleted since the base set, one a line")
    p.add_argument("--full-catalog", default=None, metavar="FILE",
                   help="today's full catalog (jsonl or csv; only its ids are read): notes of the base set not in it "
                        "are deleted")
    p.add_argument("--image-root", default=None, help="folder for relative image paths (default: the catalog's folder)")
    p.add_argument("--catalog-format", choices=["jsonl", "csv"], default=None)
    p.add_argument("--shard-size", type=int, default=1000, help="notes per shard (default 1000)")
    p.add_argument("--image-size", type=int, default=256,
                   help="larger images are scaled down to this shorter side (default 256; use the value the base "
                        "set's shards were written with, or every note's content hash changes)")
    p.add_argument("--jpeg-quality", type=int, default=90, help="(default 90; the same remark)")
    p.add_argument("--max-pixels", type=int, default=MAX_IMAGE_PIXELS, help="larger source images count as bad")
    p.add_argument("--workers", type=int, default=None, help="processes re-encoding images (default: the cores here)")
    p.add_argument("--overwrite", action="store_true", help="replace a complete earlier set in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=run)


def run(args) -> int:
    from notellm2.data_shards.writing.notes_only import write_notes
    from notellm2.data_shards.writing.shards import ShardSettings

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    settings = ShardSettings(shard_size=args.shard_size, image_size=args.image_size, jpeg_quality=args.jpeg_quality,
                             max_image_pixels=args.max_pixels)
    m = write_notes(args.catalog, args.out, image_root=args.image_root, catalog_format=args.catalog_format,
                    settings=settings, deleted=args.deleted, full_catalog=args.full_catalog, workers=args.workers,
                    overwrite=args.overwrite, progress=not args.no_progress)
    c, d = m["counts"], m["deletions"]
    print(f"notes: {c['notes_written']} written ({c['notes_with_image']} with image); "
          + {"none": "no deletions", "list": f"{d.get('count', 0)} deleted ids",
             "full_catalog": f"full catalog of {d.get('count', 0)} ids (deletions: the base's notes not in it)"}[d["kind"]])
    if m["problems"]["bad_image"]["count"]:
        p = m["problems"]["bad_image"]
        print(f"bad_image: {p['count']} (first: {', '.join(p['first'])})")
    print(f"manifest: {os.path.join(args.out, 'manifest.json')} ({len(m['shards'])} shards)")
    return 0
