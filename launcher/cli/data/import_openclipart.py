"""`notellm2 data import-openclipart`: a real catalog from Debian's openclipart packages."""
from __future__ import annotations

import json

from notellm2.data_shards.catalog.openclipart import DEFAULT_ROOT, build_openclipart_catalog


def _run(args) -> int:
    from notellm2.errors import UserError

    if args.max_per_category is not None and args.max_per_category <= 0:
        raise UserError(f"--max-per-category: got {args.max_per_category}; allowed: an integer > 0")
    if not 0.0 <= args.blank_text_fraction <= 1.0:
        raise UserError(f"--blank-text-fraction: got {args.blank_text_fraction}; allowed: a number in [0, 1]")
    summary = build_openclipart_catalog(args.out, root=args.root, min_per_category=args.min_per_category,
                                        max_items=args.max_items, max_per_category=args.max_per_category,
                                        blank_text_fraction=args.blank_text_fraction, blank_seed=args.blank_seed)
    print(json.dumps(summary))
    return 0


def register(sub) -> None:
    p = sub.add_parser("import-openclipart", help="build a JSONL catalog from /usr/share/openclipart (Debian openclipart-svg/-png)")
    p.add_argument("--out", required=True, help="catalog JSONL to write")
    p.add_argument("--root", default=DEFAULT_ROOT)
    p.add_argument("--min-per-category", type=int, default=20, help="drop leaf categories with fewer items")
    p.add_argument("--max-items", type=int, default=None)
    p.add_argument("--max-per-category", type=int, default=None,
                   help="keep at most this many notes per category, chosen by a hash of the note id (stable)")
    p.add_argument("--blank-text-fraction", type=float, default=0.0,
                   help="empty title, topics and content of this fraction of notes (hashed by note id and "
                        "--blank-seed): picture-only posts, in every split alike")
    p.add_argument("--blank-seed", type=int, default=0, help="seed of the blanking hash (default 0)")
    p.set_defaults(handler=_run)
