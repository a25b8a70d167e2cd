"""`notellm2 data note-stats`: write note_stats.parquet for a shard set written before write-shards
wrote it (the per-note statistics of the training pairs: data_shards/writing/note_stats.py)."""
from __future__ import annotations

import json
import sys


def register(sub) -> None:
    p = sub.add_parser("note-stats", help="write note_stats.parquet (training-pair frequencies and known related "
                                          "notes, for loss.logq_correction / loss.mask_known_positives) for an "
                                          "existing shard set")
    p.add_argument("--shards", required=True, help="a write-shards output dir (with manifest.json)")
    p.set_defaults(handler=run)


def run(args) -> int:
    from notellm2.data_shards.writing.note_stats import NoteStatsError, backfill_note_stats

    try:
        entry = backfill_note_stats(args.shards)
    except (NoteStatsError, FileNotFoundError) as e:
        print(f"notellm2 data note-stats: {e}", file=sys.stderr)
        return 2
    print(json.dumps(entry, indent=1))
    return 0
