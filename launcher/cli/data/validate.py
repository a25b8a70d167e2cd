"""`notellm2 data validate`: check a note catalog (and optionally a shard directory).

Exit codes: 0 no errors (warnings allowed), 1 errors found, 2 the input cannot be read at all
(missing file, unknown format). Which problems are errors and which are warnings: docs/data.md.
"""
from __future__ import annotations

import json
import sys

from notellm2.data_shards.config import MAX_IMAGE_PIXELS
from notellm2.launcher.cli import positive_int


def register(sub) -> None:
    p = sub.add_parser("validate", help="check a catalog: malformed lines, duplicate ids, missing or "
                                        "undecodable images, empty texts")
    p.add_argument("--catalog", help="notes.jsonl or notes.csv (paper column order)")
    p.add_argument("--image-root", default=None,
                   help="folder that relative image paths / CSV image ids are resolved against "
                        "(default: the catalog's folder)")
    p.add_argument("--format", choices=["jsonl", "csv"], default=None,
                   help="catalog format (default: from the file extension)")
    p.add_argument("--workers", type=positive_int, default=None,
                   help="processes decoding images (default: the cores this process may use)")
    p.add_argument("--max-pixels", type=positive_int, default=MAX_IMAGE_PIXELS,
                   help="images with more pixels are reported as unreadable")
    p.add_argument("--no-image-decode", action="store_true",
                   help="only check that image files exist (fast), do not decode them")
    p.add_argument("--shards", default=None,
                   help="also verify a write-shards output dir against its manifest (sha256, counts)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=run)


def run(args) -> int:
    from notellm2.data_shards.catalog.notes import CatalogError, validate_catalog
    from notellm2.data_shards.writing.shards import verify_shards

    if not args.catalog and not args.shards:
        print("notellm2 data validate: give --catalog and/or --shards", file=sys.stderr)
        return 2
    out: dict = {}
    rc = 0
    if args.catalog:
        try:
            report = validate_catalog(args.catalog, image_root=args.image_root, fmt=args.format,
                                      max_pixels=args.max_pixels, workers=args.workers,
                                      check_images=not args.no_image_decode, progress=not args.no_progress)
        except CatalogError as e:
            print(f"notellm2 data validate: {e}", file=sys.stderr)
            return 2
        out["catalog"] = report.to_dict()
        if not args.json:
            print(report.format())
        rc = max(rc, 0 if report.ok else 1)
    if args.shards:
        problems = verify_shards(args.shards)
        out["shards"] = {"dir": args.shards, "problems": problems, "ok": not problems}
        if not args.json:
            for p in problems:
                print(f"  ERROR {p}")
            print(f"shards {args.shards}: {'OK' if not problems else f'FAILED: {len(problems)} problems'}")
        rc = max(rc, 1 if problems else 0)
    if args.json:
        print(json.dumps(out, indent=2, ensure_ascii=False))
    return rc
