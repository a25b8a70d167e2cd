"""`notellm2 data import-openclipart`: a real catalog from Debian's openclipart packages."""
from __future__ import annotations

import json

from notellm2.data_shards.catalog.openclipart import DEFAULT_ROOT, build_openclipart_catalog
from notellm2.launcher.cli import positive_int


def _run(args) -> int:
    summary = build_openclipart_catalog(args.out, root=args.root, min_per_category=args.min_per_category,
                                        max_items=args.max_items, overwrite=args.overwrite)
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
    p.set_defaults(handler=_run)
