"""`notellm2 data mine-pairs`: view logs -> pairs.parquet, note_split.parquet, mining_manifest.json (docs/mining.md)."""
from __future__ import annotations

import argparse
import json
import sys

from notellm2.launcher.cli import finite_float, fraction, nonnegative_float, positive_int


def register(sub) -> None:
    from notellm2.data_shards.mining.mine import MiningSettings

    d = MiningSettings()
    p = sub.add_parser(
        "mine-pairs", help="mine related note pairs from view logs (co-occurrence within a window)",
        description="Mine related note pairs from view logs (CSV or Parquet with columns user_id, note_id, "
                    "timestamp). Rules and SQL: docs/mining.md.")
    p.add_argument("--views", required=True, help="view log: a .parquet/.csv file or a folder of them")
    p.add_argument("--out", required=True, help="output folder for pairs.parquet and mining_manifest.json")
    p.add_argument("--window-days", type=nonnegative_float, default=d.window_days,
                   help="B must follow A within this many days, inclusive (default %(default)s)")
    p.add_argument("--timestamp-unit", choices=["s", "ms", "us", "ns"], default=d.timestamp_unit,
                   help="unit of numeric timestamps (datetimes carry their own; default %(default)s). A log whose "
                        "timestamps reach 1e11 s (the year 5138) after conversion is refused: it is in a smaller unit")
    p.add_argument("--top-k", type=positive_int, default=d.top_k, help="partners kept per note (default %(default)s)")
    p.add_argument("--min-score", type=finite_float, default=None, help="keep pairs with score >= this (inclusive)")
    p.add_argument("--max-score", type=finite_float, default=None, help="keep pairs with score <= this (inclusive)")
    p.add_argument("--no-weighting", action="store_true",
                   help="each co-occurring user adds 1 instead of 1/N_u (N_u = distinct notes the user viewed)")
    p.add_argument("--symmetric", action="store_true",
                   help="score(A,B) := score(A,B) + score(B,A) before thresholds and ranking")
    p.add_argument("--max-views-per-user", type=positive_int, default=d.max_views_per_user,
                   help="cap: each view pairs with at most the next M views of the same user (default %(default)s)")
    p.add_argument("--split-by", choices=["time", "hash"], default=d.split_by,
                   help="hold out the latest first-seen notes (time) or a seeded hash bucket of notes (hash)")
    p.add_argument("--val-fraction", type=fraction, default=d.val_fraction, help="(default %(default)s)")
    p.add_argument("--test-fraction", type=fraction, default=d.test_fraction, help="(default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the hash split (default %(default)s)")
    p.add_argument("--pair-split", choices=["either", "both"], default=d.pair_split,
                   help="either: a pair is held out when either note is; both: a pair is kept in a split only "
                        "when both notes are in it, pairs across splits are dropped (default %(default)s)")
    p.add_argument("--engine", choices=["duckdb", "spark"], default=d.engine,
                   help="duckdb (one machine) or spark (pyspark: local[N] or a cluster) (default %(default)s)")
    p.add_argument("--spark-master", default=d.spark_master,
                   help="Spark master URL (default %(default)s; under spark-submit its --master wins)")
    p.add_argument("--spark-conf", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="Spark configuration, e.g. spark.driver.memory=8g spark.sql.shuffle.partitions=400")
    p.add_argument("--memory-limit", default=d.memory_limit,
                   help="DuckDB memory before spilling to disk (default %(default)s)")
    p.add_argument("--temp-dir", default=None,
                   help="DuckDB: spill folder; Spark: staging folder or URI for the sorted output parts "
                        "(default: a temp folder inside --out)")
    p.add_argument("--threads", type=positive_int, default=None, help="DuckDB threads (default: all available cores)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a finished mining of other inputs or settings in --out (a rerun with the same "
                        "ones does nothing)")
    p.add_argument("--quiet", action="store_true", help="no stage log lines")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from notellm2.data_shards.mining.mine import MiningSettings, mine_pairs, parse_spark_conf

    # a MiningError (the user's view log, options or --out) is reported by notellm2.launcher.cli.main
    spark_conf = parse_spark_conf(args.spark_conf)
    settings = MiningSettings(
        window_days=args.window_days, timestamp_unit=args.timestamp_unit, top_k=args.top_k, min_score=args.min_score, max_score=args.max_score,
        weighting=not args.no_weighting, symmetric=args.symmetric, max_views_per_user=args.max_views_per_user,
        split_by=args.split_by, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
        seed=args.seed, pair_split=args.pair_split, engine=args.engine, spark_master=args.spark_master,
        spark_conf=spark_conf, memory_limit=args.memory_limit, temp_directory=args.temp_dir, threads=args.threads)
    progress = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    summary = mine_pairs(args.views, args.out, settings, progress=progress, overwrite=args.overwrite)
    if summary.get("unchanged"):
        print(f"{args.out}: already holds this mining (same view log and settings); nothing to do", file=sys.stderr)
    c = summary["counts"]
    print(json.dumps({"out": args.out, "events": c["events"], "co_occurrences": c["co_occurrences"],
                      "pairs_by_split": c["pairs_by_split"], "pairs_dropped_cross_split": c["pairs_dropped_cross_split"],
                      "notes_by_split": c["notes_by_split"]}))
    return 0
