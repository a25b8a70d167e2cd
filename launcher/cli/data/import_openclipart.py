"""`notellm2 data import-openclipart`: a real catalog from Debian's openclipart packages."""
from __future__ import annotations

import json

from notellm2.data_shards.catalog.openclipart import DEFAULT_ROOT, build_openclipart_catalog
from notellm2.launcher.cli import positive_int, probability


def _run(args) -> int:
    summary = build_openclipart_catalog(args.out, root=args.root, min_per_category=args.min_per_category,
                                        max_items=args.max_items, max_per_category=args.max_per_category,
                                        blank_text_fraction=args.blank_text_fraction, blank_seed=args.blank_seed,
                                        overwrite=args.overwrite)
    print(json.dumps(summary))
    return 0


def register(sub) -> None:
    p = sub.add_parser("import-openclipart", help="build a JSONL catalog from /usr/share/openclipart (Debian openclipart-svg/-png)")
    p.add_argument("--out", required=True, help="catalog JSONL to write")
    p.add_argument("--root", default=DEFAULT_ROOT)
    p.add_argument("--min-per-category", type=positive_int, default=20, help="drop leaf categories with fewer items")
    p.add_argument("--max-items", type=positive_int, default=None)
    p.add_argument("--overwrite", action="store_true",
                   help="replace a catalog of other contents at --out (the same contents are left as they are)")
    p.add_argument("--max-per-category", type=positive_int, default=None,
                   help="keep at most this many notes per category, chosen by a hash of the note id (stable)")
    p.add_argument("--blank-text-fraction", type=probability, default=0.0,
                   help="empty title, topics and content of this fraction of notes (hashed by note id and "
                        "--blank-seed): picture-only posts, in every split alike")
    p.add_argument("--blank-seed", type=int, default=0, help="seed of the blanking hash (default 0)")
    p.set_defaults(handler=_run)
