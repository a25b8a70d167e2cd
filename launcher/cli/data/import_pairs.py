"""`notellm2 data import-pairs`: bring your own related pairs (the paper's CSVs, or one file with a split column)."""
from __future__ import annotations

import sys


def _run(args) -> int:
    from notellm2.data_shards.mining.import_pairs import import_pairs

    m = import_pairs(args.out, args.catalog, {"train": args.train, "val": args.val, "test": args.test},
                     pairs=args.pairs, allow_overlap=args.allow_overlap, image_root=args.image_root,
                     overwrite=args.overwrite)
    if m.get("unchanged"):
        print(f"{args.out}: already holds this import (same files and settings); nothing to do", file=sys.stderr)
    print("pairs: " + ", ".join(f"{s} {n}" for s, n in m["pairs"].items()) +
          "; notes: " + ", ".join(f"{s} {n}" for s, n in m["notes"].items()) +
          f"; duplicates dropped: {m['duplicates_dropped']}; notes in several splits: {m['notes_in_several_splits']}")
    print(f"wrote {args.out}/pairs.parquet, note_split.parquet, import_manifest.json")
    return 0


def register(sub) -> None:
    p = sub.add_parser("import-pairs", help="import related pairs you already have into pairs.parquet + note_split.parquet")
    p.add_argument("--catalog", required=True, help="the notes catalog (every pair id is checked against it)")
    p.add_argument("--out", required=True, help="output folder (what write-shards --pairs reads)")
    p.add_argument("--train", help="train pairs: header-less 'query_id,target_id' CSV (the paper's), a CSV with a header, or Parquet")
    p.add_argument("--val", help="val pairs (same formats)")
    p.add_argument("--test", help="test pairs (same formats)")
    p.add_argument("--pairs", help="instead: one CSV (with a header) or Parquet file with query_id, target_id, split[, score]")
    p.add_argument("--allow-overlap", action="store_true",
                   help="keep notes that sit in more than one split (refused by default)")
    p.add_argument("--image-root", default=None, help="as for `data validate`")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a finished pairs folder of other inputs in --out (the same ones: nothing is done)")
    p.set_defaults(handler=_run)
