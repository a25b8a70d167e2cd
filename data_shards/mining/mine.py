"""Co-occurrence mining: view logs -> related note pairs (`notellm2 data mine-pairs`).

The rules (docs/mining.md holds the full text and the SQL):

* Input events are (user_id, note_id, timestamp). Only a user's FIRST view of a note counts: later
  views of the same note by the same user are dropped (so a user contributes at most once to an
  ordered pair, and a refreshing bot cannot inflate a pair). N_u is the number of distinct notes
  the user viewed, i.e. the number of first views.
* A user's first views are ordered by (timestamp, note_id). View A followed by view B adds w_u to
  the ordered pair (A, B) when 0 <= t_B - t_A <= window (inclusive: exactly 7 days still counts),
  A != B by construction, and B is among the next `max_views_per_user` views after A (the cap:
  at most M partners per view, so a user with n views yields at most n*M co-occurrences).
* w_u = 1/N_u when weighting is on, else 1. Weights are accumulated in exact integer fixed point
  (units of 2^-40; w_u = floor(2^40 / N_u) units by integer division), so sums do not depend on
  summation order, thread count, partition count or engine, and ties are exact.
* Symmetric: score(A,B) := score(A,B) + score(B,A) (both directions are then present).
* Per query note, partners with min_score <= score <= max_score are ranked by score descending,
  then partner note_id ascending; the first top_k are kept.
* Split: every note of the log is assigned train/val/test (by first-seen time quantile or by a
  seeded sha256 bucket) and saved as note_split.parquet. Pair split "either": a pair is test if
  either note is test, else val if either is val, else train. "both": a pair keeps the split of
  its two notes when they agree and is dropped (and counted) when they do not. Either way train
  pairs only hold train notes.

Two engines run the same SQL (data_shards/mining/sql.py): DuckDB on one machine
(data_shards/mining/engine_duckdb.py) and Spark (data_shards/mining/engine_spark.py) for logs that live on a
cluster. This module holds the settings, the input listing, the manifest and the entry point.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from notellm2.errors import UserError
from notellm2.data_shards.mining.sql import (HASH_BITS, MAX_TIMESTAMP_SECONDS, SQL_COUNT_EVENTS,  # noqa: F401
                                    SQL_TIMESTAMP_RANGE, WEIGHT_SCALE, hash_thresholds, split_counts,
                                    sql_first_bad_row, sql_view_log, weight_scale)
from notellm2.files import atomic_write_text, sha256_file
from notellm2.outputs import check_folder_output, make_folder, remove_made, reuse_finished

log = logging.getLogger("notellm2.mining")

SECONDS_PER_DAY = 86_400
FORMAT_VERSION = 2
REQUIRED_COLUMNS = ("user_id", "note_id", "timestamp")
ENGINES = ("duckdb", "spark")
PAIR_SPLITS = ("either", "both")
# --timestamp-unit: what one unit of a numeric timestamp is, as a divisor to seconds
TIMESTAMP_UNITS = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
# DuckDB's memory_limit: a number and a unit (or a percentage of the machine's memory)
_MEMORY_RE = re.compile(r"^\s*\d+(\.\d+)?\s*(b|bytes?|kb|mb|gb|tb|kib|mib|gib|tib|%)\s*$", re.IGNORECASE)
MANIFEST = "mining_manifest.json"
OUTPUTS = ("pairs.parquet", "note_split.parquet", MANIFEST)
# Settings that choose how the rules run, not what they compute: left out of the manifest's
# `settings` (so two engines' manifests compare equal) and recorded under `engine` instead.
_ENGINE_KEYS = ("engine", "memory_limit", "temp_directory", "threads", "spark_master", "spark_conf")


class MiningError(UserError, ValueError):
    """Bad input or settings for co-occurrence mining (the message names the file or the key)."""


@dataclass
class MiningSettings:
    # Co-occurrence window: B must be viewed at most this long after A (inclusive).
    window_days: float = 7.0
    # The unit of numeric timestamps (datetimes carry their own): s, ms, us or ns.
    timestamp_unit: Literal["s", "ms", "us", "ns"] = "s"
    # Partners kept per query note after thresholds.
    top_k: int = 10
    # Inclusive score thresholds applied before top-k (None: no bound).
    min_score: float | None = None
    max_score: float | None = None
    # Weight each user's co-occurrences by 1/N_u (N_u = distinct notes the user viewed).
    weighting: bool = True
    # score(A,B) := score(A,B) + score(B,A) before thresholds and ranking.
    symmetric: bool = False
    # Cap: each view pairs with at most the next M views of the same user (bounds bots to O(M)/view).
    max_views_per_user: int = 20
    # How notes are held out: "time" (latest first-seen notes) or "hash" (seeded stable bucket).
    split_by: Literal["time", "hash"] = "time"
    val_fraction: float = 0.05
    test_fraction: float = 0.1
    # Seed of the hash split (the time split does not use it).
    seed: int = 0
    # How a pair gets its split from its notes' splits: "either" (a held-out note makes the pair
    # held out) or "both" (both notes in the split; pairs across splits are dropped and counted).
    pair_split: Literal["either", "both"] = "either"
    # Engine: "duckdb" (one machine) or "spark" (pyspark; a cluster or local[N]).
    engine: Literal["duckdb", "spark"] = "duckdb"
    # DuckDB resources: memory before spilling, spill folder (None: a temp dir), threads (None: all cores).
    # With Spark, temp_directory becomes spark.local.dir.
    memory_limit: str = "2GB"
    temp_directory: str | None = None
    threads: int | None = None
    # Spark: master URL (ignored under spark-submit, whose --master wins) and extra conf k -> v.
    spark_master: str = "local[*]"
    spark_conf: dict = field(default_factory=dict)

    def validate(self) -> None:
        def bad(key: str, allowed: str) -> MiningError:
            return MiningError(f"mining setting '{key}' = {getattr(self, key)!r}: expected {allowed}")

        def finite(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not (finite(self.window_days) and self.window_days >= 0):
            raise bad("window_days", "a finite number >= 0")
        if self.timestamp_unit not in TIMESTAMP_UNITS:
            raise bad("timestamp_unit", "one of: " + ", ".join(TIMESTAMP_UNITS))
        if not (isinstance(self.top_k, int) and self.top_k > 0):
            raise bad("top_k", "an integer > 0")
        if not (isinstance(self.max_views_per_user, int) and self.max_views_per_user > 0):
            raise bad("max_views_per_user", "an integer > 0")
        for key in ("min_score", "max_score"):
            v = getattr(self, key)
            if v is not None and not finite(v):
                raise bad(key, "a finite number or None")
        if self.min_score is not None and self.max_score is not None and self.min_score > self.max_score:
            raise bad("min_score", f"a value <= max_score ({self.max_score})")
        if self.split_by not in ("time", "hash"):
            raise bad("split_by", "one of: time, hash")
        for key in ("val_fraction", "test_fraction"):
            v = getattr(self, key)
            if not (finite(v) and 0 <= v < 1):
                raise bad(key, "a number in [0, 1)")
        if self.val_fraction + self.test_fraction >= 1:
            raise bad("test_fraction", f"val_fraction + test_fraction < 1 (val_fraction={self.val_fraction})")
        if self.pair_split not in PAIR_SPLITS:
            raise bad("pair_split", "one of: " + ", ".join(PAIR_SPLITS))
        if self.engine not in ENGINES:
            raise bad("engine", "one of: " + ", ".join(ENGINES))
        if self.threads is not None and not (isinstance(self.threads, int) and self.threads > 0):
            raise bad("threads", "an integer > 0 or None")
        if not isinstance(self.spark_conf, dict):
            raise bad("spark_conf", "a dict of Spark configuration key -> value")
        if self.engine == "duckdb" and not (isinstance(self.memory_limit, str) and _MEMORY_RE.match(self.memory_limit)):
            raise bad("memory_limit", "a size such as 2GB, 512MiB or 80%")

    @property
    def window_seconds(self) -> int:
        return int(round(self.window_days * SECONDS_PER_DAY))


def hash_split_bucket(note_id: str, seed: int) -> int:
    """A note's bucket in [0, 2^60) for the hash split: the first 15 hex digits of
    sha256("<seed>:<note_id>"), the same value both engines compute in SQL."""
    return int(hashlib.sha256(f"{int(seed)}:{note_id}".encode("utf-8")).hexdigest()[:HASH_BITS // 4], 16)


def hash_split_of(note_id: str, settings: MiningSettings) -> str:
    t_test, t_val = hash_thresholds(settings.val_fraction, settings.test_fraction)
    b = hash_split_bucket(note_id, settings.seed)
    return "test" if b < t_test else "val" if b < t_val else "train"


def parse_spark_conf(items) -> dict:
    """["k=v", ...] -> {k: v}; a one-line error names the malformed item."""
    conf = {}
    for item in items or ():
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise MiningError(f"--spark-conf {item!r}: expected key=value (e.g. spark.sql.shuffle.partitions=64)")
        conf[key.strip()] = value
    return conf


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------

_PARQUET_EXT = (".parquet", ".pq")
_CSV_EXT = (".csv", ".csv.gz", ".tsv", ".tsv.gz")


def is_uri(path) -> bool:
    """hdfs://, s3a://, gs://, abfss://, file:// ...: read by Spark, not listed here."""
    return "://" in str(path)


def input_files(views_path: str | os.PathLike) -> tuple[list[Path], str]:
    """The view-log files under a local path (a file, or a folder of one format) and their kind."""
    path = Path(views_path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith((".", "_")))
        kinds = {kind_of(p) for p in files}
        kinds.discard(None)
        if not kinds:
            raise MiningError(f"{path}: no .parquet or .csv view-log files in this folder")
        if len(kinds) > 1:
            raise MiningError(f"{path}: mixes Parquet and CSV view-log files; keep one format per folder")
        kind = kinds.pop()
        return _not_empty([p for p in files if kind_of(p) == kind]), kind
    if not path.exists():
        raise MiningError(f"{path}: view log not found")
    kind = kind_of(path)
    if kind is None:
        raise MiningError(f"{path}: unknown view-log format (expected .parquet, .pq, .csv, .csv.gz, .tsv)")
    return _not_empty([path]), kind


def _not_empty(files: list[Path]) -> list[Path]:
    for f in files:
        if f.stat().st_size == 0:
            raise MiningError(f"{f}: the file is empty (no header, no view events)")
    return files


def kind_of(path) -> str | None:
    name = str(path).rstrip("/").lower()
    if name.endswith(_PARQUET_EXT):
        return "parquet"
    if name.endswith(_CSV_EXT):
        return "csv"
    return None



def load_view_log(db, label: str, types: dict, dialect, timestamp_unit: str = "s") -> int:
    """Create `view_log` from the registered `view_source`; checks shared by both engines."""
    missing = [c for c in REQUIRED_COLUMNS if c not in types]
    if missing:
        raise MiningError(f"{label}: missing column(s) {missing}; found {sorted(types)}; "
                          f"expected {list(REQUIRED_COLUMNS)}")
    ts_expr = dialect.timestamp_expr(types["timestamp"], TIMESTAMP_UNITS[timestamp_unit])
    if not ts_expr:
        raise MiningError(f"{label}: column 'timestamp' has type {types['timestamp']}: "
                          f"expected unix seconds or a datetime")
    db.create("view_log", sql_view_log(dialect, ts_expr))
    n_events, n_bad = db.rows(SQL_COUNT_EVENTS)[0]
    if n_bad:
        row = db.rows(sql_first_bad_row(dialect, ts_expr))[0]
        raise MiningError(f"{label}: {n_bad} view event(s) with a missing user_id/note_id or an "
                          f"unparseable timestamp; first: user_id={row[0]!r}, note_id={row[1]!r}, "
                          f"timestamp={row[2]!r}")
    if n_events == 0:
        raise MiningError(f"{label}: the view log has no events")
    check_timestamp_range(label, *db.rows(SQL_TIMESTAMP_RANGE)[0], timestamp_unit)
    return int(n_events)


def check_timestamp_range(label: str, low, high, unit: str) -> None:
    """Refuse timestamps whose magnitude says they are not in `unit` (the rule in docs/mining.md):
    after conversion to seconds no |timestamp| may reach MAX_TIMESTAMP_SECONDS (1e11 s, the year 5138).
    A log in milliseconds read as seconds would make the window 1000 times shorter."""
    peak = max(abs(int(low)), abs(int(high)))
    if peak < MAX_TIMESTAMP_SECONDS:
        return
    raw = peak * TIMESTAMP_UNITS[unit]
    guess = next((u for u, d in TIMESTAMP_UNITS.items() if raw // d < MAX_TIMESTAMP_SECONDS), "ns")
    hint = (f"pass --timestamp-unit {guess}" if TIMESTAMP_UNITS[guess] > TIMESTAMP_UNITS[unit]
            else "check the column")
    raise MiningError(f"{label}: column 'timestamp' reaches {raw} {unit}, past the year 5000 when read as "
                      f"{ {'s': 'seconds', 'ms': 'milliseconds', 'us': 'microseconds', 'ns': 'nanoseconds'}[unit]}: "
                      f"the values look like {guess}; {hint} (the window would be wrong)")


def check_pairs(counts: dict, label: str) -> None:
    """Refuse a mining that found no pair at all (nothing would be written that a later stage could use)."""
    if sum(counts.get("pairs_by_split", {}).values()):
        return
    raise MiningError(f"{label}: no related pair mined from {counts.get('events')} view events "
                      f"({counts.get('co_occurrences', 0)} co-occurrences within the window; "
                      f"{counts.get('pairs_dropped_cross_split', 0)} pairs dropped across splits): widen "
                      f"--window-days or loosen --min-score/--max-score; nothing was written")


class Stages:
    """Runs named steps, times them, and reports one line per step."""

    def __init__(self, progress):
        self.timings: dict[str, float] = {}
        self.progress = progress
        self.t_start = time.perf_counter()

    def run(self, name: str, fn, *args):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn(*args)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        self.timings[name] = round(dt, 3)
        msg = (f"mine-pairs: {name:<14s} {dt:7.2f} s wall {cpu:7.2f} s cpu "
               f"(total {time.perf_counter() - self.t_start:7.2f} s)")
        log.info(msg)
        if self.progress:
            self.progress(msg)
        return out


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------

def mine_pairs(views_path: str | os.PathLike, out_dir: str | os.PathLike,
               settings: MiningSettings | None = None, progress=None, spark=None, overwrite: bool = False) -> dict:
    """Mine related note pairs from a view log into `out_dir`: pairs.parquet, note_split.parquet
    and mining_manifest.json.

    `views_path`: a CSV/Parquet file, or a folder of them, with columns user_id, note_id, timestamp
    (with the Spark engine also a URI Spark can read, e.g. hdfs://... or s3a://...).
    `progress`: optional callable receiving one line per finished stage.
    `spark`: an existing SparkSession to use (engine "spark"; it is left running).
    `overwrite`: replace a finished mining of other inputs or settings in `out_dir` (without it that is
    refused; a finished mining of the same inputs and settings is returned as it is, nothing recomputed).
    Returns the summary that is also written as the manifest. On a failure nothing is left behind: no
    spill folder, and no `out_dir` when this call created it.
    """
    settings = settings or MiningSettings()
    settings.validate()
    out = Path(out_dir)
    if is_uri(out):
        raise MiningError(f"--out {out}: must be a folder on the machine that runs the command "
                          f"(the pairs file is assembled there); see docs/mining.md")
    check_folder_output(str(out))
    if is_uri(views_path):
        if settings.engine != "spark":
            raise MiningError(f"{views_path}: a URI view log needs --engine spark")
        files, kind = [], kind_of(views_path) or "parquet"
    else:
        files, kind = input_files(views_path)
    stages = Stages(progress)
    inputs = stages.run("hash-inputs", lambda: (
        [{"path": str(f.resolve()), "bytes": f.stat().st_size, "sha256": sha256_file(f)} for f in files]
        or [{"path": str(views_path)}]))
    rule_settings = {k: v for k, v in asdict(settings).items() if k not in _ENGINE_KEYS}
    previous = finished_mining(out)
    if previous is not None:
        # a URI log cannot be hashed here: its finished mining is never taken as the same
        request = _request(FORMAT_VERSION, rule_settings, inputs) if files else {"view_log": f"{views_path} (a URI)"}
        if reuse_finished(str(out), _request(previous.get("format_version"), previous.get("settings"),
                                             previous.get("inputs")), request, overwrite, "a finished mining",
                          error=MiningError):
            log.info("mine-pairs: %s already holds this mining (same view log and settings): nothing to do", out)
            return {**previous, "unchanged": True}
        os.remove(out / MANIFEST)  # the folder is incomplete until the new manifest lands
    created = make_folder(str(out))
    try:
        if settings.engine == "duckdb":
            from notellm2.data_shards.mining.engine_duckdb import run_duckdb as run_engine
        else:
            from notellm2.data_shards.mining.engine_spark import run_spark as run_engine
        counts, outputs, engine = run_engine(views_path, files, kind, out, settings, stages, spark=spark)
        summary = {
            "format_version": FORMAT_VERSION,
            "settings": rule_settings,
            "inputs": inputs,
            "input_format": kind,
            "counts": counts,
            "outputs": outputs,
            "engine": engine,
            "timings_s": stages.timings,
        }
        atomic_write_text(str(out / MANIFEST), json.dumps(summary, indent=2, sort_keys=False) + "\n")
    except BaseException:
        remove_made(created)
        raise
    return summary


def finished_mining(out: Path) -> dict | None:
    """The manifest of a finished mining in `out` (None when there is none, or it cannot be read: a
    folder of an interrupted run, whose files the new run replaces)."""
    path = Path(out) / MANIFEST
    if not path.is_file():
        return None
    try:
        with open(path) as fh:
            manifest = json.load(fh)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _request(format_version, settings, inputs) -> dict:
    """What decides a mining's output: the rules' settings and the view log's bytes (not its path)."""
    return {"format_version": format_version, "settings": settings,
            "view_log_sha256": [i.get("sha256") for i in inputs or [] if isinstance(i, dict)]}
