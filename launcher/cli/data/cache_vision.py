"""`notellm2 data cache-vision`: the frozen vision tower's features of every note, computed once and
stored beside the shards (docs/reader.md, "The vision cache"; library: launcher/train/vision_cache.py)."""
from __future__ import annotations

import json

from notellm2.launcher.cli import add_config_args, config_from_args, nonnegative_int, positive_int


def register(sub) -> None:
    p = sub.add_parser("cache-vision", help="run the frozen vision tower once over the notes of shard sets and "
                                            "store its features (data.vision_cache)")
    p.add_argument("--shards", action="append", default=None, metavar="PATTERN",
                   help="shards to cover (glob or brace pattern; repeat for several sets). Default: every shard set "
                        "of --config (data.train_shards, data.val_shards, data.notes_shards, eval.notes_shards)")
    p.add_argument("--out", default=None, help="cache folder to write (default: data.vision_cache of --config)")
    p.add_argument("--flip", action="store_true",
                   help="also store the horizontally flipped orientation (needed by data.random_flip: true)")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                   help="stored values: float32 (exact, the default) or float16 (half the bytes, ~3 digits)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per tower call (default 32)")
    p.add_argument("--num-workers", type=nonnegative_int, default=None,
                   help="processes decoding images (default: data.num_workers of the config)")
    p.add_argument("--device", default=None, help="torch device of the tower (default: cuda if present, else cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_config_args(p)
    p.set_defaults(handler=_run)


def _run(args) -> int:
    import logging

    from notellm2.errors import UserError
    from notellm2.launcher.train.vision_cache import build_vision_cache

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.batch_size <= 0:
        raise UserError(f"--batch-size: got {args.batch_size}; allowed: an integer > 0")
    cfg = config_from_args(args)
    s = build_vision_cache(cfg, args.out, shards=args.shards, flip=args.flip, dtype=args.dtype,
                           batch_size=args.batch_size, num_workers=args.num_workers, overwrite=args.overwrite,
                           progress=not args.no_progress, device=args.device)
    bad = f"; their notes are listed in {s['path']}/bad_images.json" if s['bad_images'] else ""
    print(f"cached {s['notes_with_features']} notes' tower features ({s['bad_images']} bad images recorded{bad}) from "
          f"{len(s['shards'])} shard(s), {'+'.join(s['orientations'])}, {s['dtype']}, "
          f"[{s['num_tokens']} x {s['token_dim']}] + [{s['pooled_dim']}] per image: {s['bytes'] / 2**20:.1f} MiB "
          f"in {s['seconds']:.1f} s (tower {s['tower_seconds']:.1f} s on {s['device']})")
    print(f"tower key: {s['tower_key']}")
    print(f"cache: {s['path']}  (use it with data.vision_cache={json.dumps(s['path'])})")
    return 0
