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
  (units of 2^-40; w_u = floor(2^40 / N_u) units), so sums do not depend on summation order,
  thread count or engine, and ties are exact.
* Symmetric: score(A,B) := score(A,B) + score(B,A) (both directions are then present).
* Per query note, partners with min_score <= score <= max_score are ranked by score descending,
  then partner note_id ascending; the first top_k are kept.
* Split: every note of the log is assigned train/val/test (by first-seen time quantile or by a
  seeded hash bucket); a pair is test if either note is test, else val if either note is val,
  else train. So train pairs only hold train notes.

The engine is DuckDB (spills to `temp_directory` past `memory_limit`). The core queries use only
standard SQL with window functions (portable to Spark SQL); reading (file scans, timestamp
parsing), writing (COPY) and the hash split (Python, registered as a table) are the DuckDB- or
Python-specific parts and live in their own small functions.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger("notellm2.mining")

# Fixed-point scale of the weights: one unit is 2^-40 of a score point (with weighting on; without
# it a unit is one co-occurring user, so counts never overflow).
WEIGHT_SCALE = 1 << 40
SECONDS_PER_DAY = 86_400
FORMAT_VERSION = 1
REQUIRED_COLUMNS = ("user_id", "note_id", "timestamp")


class MiningError(ValueError):
    """Bad input or settings for co-occurrence mining (the message names the file or the key)."""


@dataclass
class MiningSettings:
    # Co-occurrence window: B must be viewed at most this long after A (inclusive).
    window_days: float = 7.0
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
    # DuckDB resources: memory before spilling, spill folder (None: a temp dir), threads (None: all cores).
    memory_limit: str = "2GB"
    temp_directory: str | None = None
    threads: int | None = None

    def validate(self) -> None:
        def bad(key: str, allowed: str) -> MiningError:
            return MiningError(f"mining setting '{key}' = {getattr(self, key)!r}: expected {allowed}")

        if not (isinstance(self.window_days, (int, float)) and self.window_days >= 0):
            raise bad("window_days", "a number >= 0")
        if not (isinstance(self.top_k, int) and self.top_k > 0):
            raise bad("top_k", "an integer > 0")
        if not (isinstance(self.max_views_per_user, int) and self.max_views_per_user > 0):
            raise bad("max_views_per_user", "an integer > 0")
        for key in ("min_score", "max_score"):
            v = getattr(self, key)
            if v is not None and not isinstance(v, (int, float)):
                raise bad(key, "a number or None")
        if self.min_score is not None and self.max_score is not None and self.min_score > self.max_score:
            raise bad("min_score", f"a value <= max_score ({self.max_score})")
        if self.split_by not in ("time", "hash"):
            raise bad("split_by", "one of: time, hash")
        for key in ("val_fraction", "test_fraction"):
            v = getattr(self, key)
            if not (isinstance(v, (int, float)) and 0 <= v < 1):
                raise bad(key, "a number in [0, 1)")
        if self.val_fraction + self.test_fraction >= 1:
            raise bad("test_fraction", f"val_fraction + test_fraction < 1 (val_fraction={self.val_fraction})")
        if self.threads is not None and not (isinstance(self.threads, int) and self.threads > 0):
            raise bad("threads", "an integer > 0 or None")

    @property
    def window_seconds(self) -> int:
        return int(round(self.window_days * SECONDS_PER_DAY))


# --------------------------------------------------------------------------------------------
# Portable core queries (standard SQL + window functions; run as-is on Spark SQL given tables
# `view_log(user_id, note_id, ts BIGINT)`).
# --------------------------------------------------------------------------------------------

SQL_NOTES = """
CREATE TABLE notes AS
SELECT note_id,
       first_seen,
       CAST(ROW_NUMBER() OVER (ORDER BY note_id) - 1 AS INTEGER) AS nidx
FROM (SELECT note_id, MIN(ts) AS first_seen FROM view_log GROUP BY note_id) s
"""

# A user's first view of each note; N_u = number of such rows; weight in 2^-40 units.
SQL_FIRST_VIEWS = """
CREATE TABLE first_views AS
SELECT v.user_id, n.nidx, MIN(v.ts) AS ts
FROM view_log v JOIN notes n ON v.note_id = n.note_id
GROUP BY v.user_id, n.nidx
"""

SQL_USERS = """
CREATE TABLE users AS
SELECT user_id,
       n_notes,
       CAST(ROW_NUMBER() OVER (ORDER BY user_id) AS INTEGER) AS uidx,
       {weight_expr} AS w
FROM (SELECT user_id, COUNT(*) AS n_notes FROM first_views GROUP BY user_id) s
"""

# rn: 1-based position of the view in the user's (ts, note_id) order. blk = floor(rn / M) puts
# the next M views of any view into its own block or the block after, which turns "the next M
# views" into an equality join (bounded work: at most 2M candidates per view, never n^2).
# Users with a single note cannot form a pair and are left out here.
SQL_EVENTS = """
CREATE TABLE events AS
SELECT uidx, nidx, ts, w, CAST(rn AS INTEGER) AS rn, CAST(FLOOR(rn / {m}) AS INTEGER) AS blk
FROM (SELECT u.uidx, f.nidx, f.ts, u.w,
             ROW_NUMBER() OVER (PARTITION BY u.uidx ORDER BY f.ts, f.nidx) AS rn
      FROM first_views f JOIN users u ON f.user_id = u.user_id
      WHERE u.n_notes >= 2) s
"""

# (A, B) for B among the next M views of the same user, at most `window` seconds later.
SQL_CO_OCCURRENCES = """
FROM events e1
JOIN (SELECT uidx, rn, ts, nidx, blk FROM events
      UNION ALL
      SELECT uidx, rn, ts, nidx, blk - 1 AS blk FROM events) e2
  ON e2.uidx = e1.uidx AND e2.blk = e1.blk
WHERE e2.rn > e1.rn AND e2.rn <= e1.rn + {m} AND e2.ts - e1.ts <= {window}
"""

SQL_PAIR_SCORES = """
CREATE TABLE pair_scores AS
SELECT e1.nidx AS a, e2.nidx AS b, CAST(SUM(e1.w) AS BIGINT) AS units
{co_occurrences}
GROUP BY e1.nidx, e2.nidx
"""

# Counted in a separate streaming pass: a COUNT(*) inside the aggregation above costs more.
SQL_COUNT_CO_OCCURRENCES = """
SELECT COUNT(*) {co_occurrences}
"""

SQL_SYMMETRIC = """
CREATE TABLE pair_scores_sym AS
SELECT a, b, CAST(SUM(units) AS BIGINT) AS units
FROM (SELECT a, b, units FROM pair_scores
      UNION ALL
      SELECT b AS a, a AS b, units FROM pair_scores) s
GROUP BY a, b
"""

# nidx follows note_id order, so "b ASC" is "partner note_id ascending".
SQL_TOP_K = """
CREATE TABLE top_pairs AS
SELECT a, b, units, rnk
FROM (SELECT a, b, units,
             ROW_NUMBER() OVER (PARTITION BY a ORDER BY units DESC, b ASC) AS rnk
      FROM {scores}
      WHERE {threshold}) s
WHERE rnk <= {top_k}
"""

# Time split: rank notes by (first_seen, note_id); the last n_test are test, the n_val before val.
SQL_SPLIT_TIME = """
CREATE TABLE note_split AS
SELECT nidx,
       CASE WHEN pos >= {n_notes} - {n_test} THEN 'test'
            WHEN pos >= {n_notes} - {n_test} - {n_val} THEN 'val'
            ELSE 'train' END AS split
FROM (SELECT nidx, ROW_NUMBER() OVER (ORDER BY first_seen, note_id) - 1 AS pos FROM notes) s
"""

SQL_PAIRS = """
CREATE TABLE pairs AS
SELECT qn.note_id AS query_id,
       tn.note_id AS target_id,
       CAST(p.units AS DOUBLE) / {scale} AS score,
       CASE WHEN qs.split = 'test' OR ts.split = 'test' THEN 'test'
            WHEN qs.split = 'val' OR ts.split = 'val' THEN 'val'
            ELSE 'train' END AS split,
       p.a, p.rnk
FROM top_pairs p
JOIN notes qn ON qn.nidx = p.a
JOIN notes tn ON tn.nidx = p.b
JOIN note_split qs ON qs.nidx = p.a
JOIN note_split ts ON ts.nidx = p.b
"""


def weight_scale(weighting: bool) -> int:
    """Units per score point: 2^40 with 1/N_u weighting, 1 without (a unit is then one user)."""
    return WEIGHT_SCALE if weighting else 1


def _weight_expr(weighting: bool) -> str:
    if weighting:
        return f"CAST(FLOOR({WEIGHT_SCALE}.0 / n_notes) AS BIGINT)"
    return "CAST(1 AS BIGINT)"


def _threshold_expr(settings: MiningSettings) -> str:
    scale = f"{weight_scale(settings.weighting)}.0"
    terms = []
    if settings.min_score is not None:
        terms.append(f"CAST(units AS DOUBLE) / {scale} >= {float(settings.min_score)!r}")
    if settings.max_score is not None:
        terms.append(f"CAST(units AS DOUBLE) / {scale} <= {float(settings.max_score)!r}")
    return " AND ".join(terms) or "TRUE"


def hash_split_bucket(note_id: str, seed: int) -> float:
    """Stable bucket in [0, 1) of a note for the hash split (blake2b keyed by the seed)."""
    digest = hashlib.blake2b(note_id.encode("utf-8"), digest_size=8,
                             key=str(int(seed)).encode("ascii")).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


def split_counts(n_notes: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(n_val, n_test) notes held out by the time split."""
    n_test = int(n_notes * test_fraction)
    n_val = int(n_notes * val_fraction)
    return n_val, n_test


def hash_split_of(note_id: str, settings: MiningSettings) -> str:
    b = hash_split_bucket(note_id, settings.seed)
    if b < settings.test_fraction:
        return "test"
    if b < settings.test_fraction + settings.val_fraction:
        return "val"
    return "train"


# --------------------------------------------------------------------------------------------
# DuckDB-specific parts: sources, timestamp parsing, the connection, sinks.
# --------------------------------------------------------------------------------------------

_PARQUET_EXT = (".parquet", ".pq")
_CSV_EXT = (".csv", ".csv.gz", ".tsv", ".tsv.gz")


def _input_files(views_path: str | os.PathLike) -> tuple[list[Path], str]:
    path = Path(views_path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith((".", "_")))
        kinds = {_kind_of(p) for p in files}
        kinds.discard(None)
        if not kinds:
            raise MiningError(f"{path}: no .parquet or .csv view-log files in this folder")
        if len(kinds) > 1:
            raise MiningError(f"{path}: mixes Parquet and CSV view-log files; keep one format per folder")
        kind = kinds.pop()
        return [p for p in files if _kind_of(p) == kind], kind
    if not path.exists():
        raise MiningError(f"{path}: view log not found")
    kind = _kind_of(path)
    if kind is None:
        raise MiningError(f"{path}: unknown view-log format (expected .parquet, .pq, .csv, .csv.gz, .tsv)")
    return [path], kind


def _kind_of(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(_PARQUET_EXT):
        return "parquet"
    if name.endswith(_CSV_EXT):
        return "csv"
    return None


def _sql_str(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def _source_sql(files: list[Path], kind: str) -> str:
    lst = "[" + ", ".join(_sql_str(str(f)) for f in files) + "]"
    if kind == "parquet":
        return f"read_parquet({lst}, union_by_name = true)"
    return f"read_csv({lst}, header = true, union_by_name = true)"


def _timestamp_expr(type_name: str) -> str:
    """SQL turning the `timestamp` column into unix seconds (BIGINT), by its detected type."""
    t = type_name.upper()
    if t in ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT",
             "UINTEGER", "UBIGINT"):
        return '"timestamp"::BIGINT'
    if t in ("FLOAT", "DOUBLE") or t.startswith("DECIMAL"):
        return 'CAST(FLOOR("timestamp") AS BIGINT)'
    # Datetimes without a zone are UTC (the connection's TimeZone is set to UTC).
    if t.startswith("TIMESTAMP"):
        return 'CAST(FLOOR(epoch("timestamp")) AS BIGINT)'
    if t == "DATE":
        return 'CAST(FLOOR(epoch(CAST("timestamp" AS TIMESTAMP))) AS BIGINT)'
    if t == "VARCHAR":
        # Digits are unix seconds; anything else must parse as a datetime.
        return ('COALESCE(TRY_CAST("timestamp" AS BIGINT), '
                'CAST(FLOOR(epoch(TRY_CAST("timestamp" AS TIMESTAMPTZ))) AS BIGINT))')
    raise MiningError(f"column 'timestamp' has type {type_name}: expected unix seconds or a datetime")


def _connect(settings: MiningSettings, temp_dir: str):
    import duckdb

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = settings.threads or cores
    con = duckdb.connect(config={
        "memory_limit": settings.memory_limit,
        "temp_directory": temp_dir,
        "threads": int(threads),
        "preserve_insertion_order": False,
    })
    con.execute("SET enable_progress_bar = false")
    con.execute("SET TimeZone = 'UTC'")
    return con, int(threads)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class _Stages:
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


def mine_pairs(views_path: str | os.PathLike, out_dir: str | os.PathLike,
               settings: MiningSettings | None = None, progress=None) -> dict:
    """Mine related note pairs from a view log into `out_dir/pairs.parquet` + `mining_manifest.json`.

    `views_path`: a CSV/Parquet file, or a folder of them, with columns user_id, note_id, timestamp.
    `progress`: optional callable receiving one line per finished stage.
    Returns the summary that is also written as the manifest.
    """
    settings = settings or MiningSettings()
    settings.validate()
    files, kind = _input_files(views_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    own_tmp = settings.temp_directory is None
    spill_dir = tempfile.mkdtemp(prefix=".mining-spill-", dir=out) if own_tmp else settings.temp_directory
    stages = _Stages(progress)
    con, threads = _connect(settings, spill_dir)
    try:
        engine = {"name": "duckdb", "version": __import__("duckdb").__version__,
                  "threads": threads, "memory_limit": settings.memory_limit}
        summary = _mine(con, files, kind, out, settings, stages, engine)
    finally:
        con.close()
        if own_tmp:
            shutil.rmtree(spill_dir, ignore_errors=True)
    return summary


def _mine(con, files: list[Path], kind: str, out: Path, settings: MiningSettings, stages: _Stages,
          engine: dict) -> dict:
    label = str(files[0]) if len(files) == 1 else f"{files[0].parent} ({len(files)} files)"
    source = _source_sql(files, kind)

    def load():
        try:
            cols = con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()
        except Exception as e:  # duckdb raises its own error types; name the file
            raise MiningError(f"{label}: cannot read the view log: {e}") from e
        types = {c[0]: c[1] for c in cols}
        missing = [c for c in REQUIRED_COLUMNS if c not in types]
        if missing:
            raise MiningError(f"{label}: missing column(s) {missing}; found {sorted(types)}; "
                              f"expected {list(REQUIRED_COLUMNS)}")
        ts_expr = _timestamp_expr(types["timestamp"])
        con.execute(f"""CREATE TABLE view_log AS
                        SELECT user_id, CAST(note_id AS VARCHAR) AS note_id, {ts_expr} AS ts
                        FROM {source}""")
        n_events, n_bad = con.execute(
            "SELECT COUNT(*), COUNT(*) FILTER (WHERE user_id IS NULL OR note_id IS NULL OR ts IS NULL) "
            "FROM view_log").fetchall()[0]
        if n_bad:
            row = con.execute(f"""SELECT user_id, note_id, "timestamp" FROM {source}
                                  WHERE user_id IS NULL OR note_id IS NULL OR ({ts_expr}) IS NULL
                                  LIMIT 1""").fetchall()[0]
            raise MiningError(f"{label}: {n_bad} view event(s) with a missing user_id/note_id or an "
                              f"unparseable timestamp; first: user_id={row[0]!r}, note_id={row[1]!r}, "
                              f"timestamp={row[2]!r}")
        if n_events == 0:
            raise MiningError(f"{label}: the view log has no events")
        return n_events

    n_events = stages.run("read", load)

    def users_and_views():
        con.execute(SQL_NOTES)
        con.execute(SQL_FIRST_VIEWS)
        con.execute("DROP TABLE view_log")
        con.execute(SQL_USERS.format(weight_expr=_weight_expr(settings.weighting)))
        con.execute(SQL_EVENTS.format(m=settings.max_views_per_user))
        con.execute("DROP TABLE first_views")
        return con.execute("SELECT (SELECT COUNT(*) FROM notes), (SELECT COUNT(*) FROM users), "
                           "(SELECT SUM(n_notes) FROM users)").fetchall()[0]

    n_notes, n_users, n_first_views = stages.run("first-views", users_and_views)

    def co_occurrence():
        co = SQL_CO_OCCURRENCES.format(m=settings.max_views_per_user, window=settings.window_seconds)
        n_co = con.execute(SQL_COUNT_CO_OCCURRENCES.format(co_occurrences=co)).fetchall()[0][0]
        con.execute(SQL_PAIR_SCORES.format(co_occurrences=co))
        con.execute("DROP TABLE events")
        return con.execute("SELECT COUNT(*) FROM pair_scores").fetchall()[0][0], n_co

    n_scored, n_cooc = stages.run("co-occurrence", co_occurrence)

    def rank():
        scores = "pair_scores"
        if settings.symmetric:
            con.execute(SQL_SYMMETRIC)
            scores = "pair_scores_sym"
        con.execute(SQL_TOP_K.format(scores=scores, threshold=_threshold_expr(settings), top_k=settings.top_k))
        return con.execute(f"SELECT COUNT(*) FROM {scores}").fetchall()[0][0]

    n_candidates = stages.run("rank", rank)

    def split():
        if settings.split_by == "time":
            n_val, n_test = split_counts(n_notes, settings.val_fraction, settings.test_fraction)
            con.execute(SQL_SPLIT_TIME.format(n_notes=n_notes, n_test=n_test, n_val=n_val))
        else:
            import pyarrow as pa

            ids = con.sql("SELECT nidx, note_id FROM notes").to_arrow_table()
            splits = [hash_split_of(n, settings) for n in ids.column("note_id").to_pylist()]
            note_split_arrow = pa.table({"nidx": ids.column("nidx"), "split": pa.array(splits)})
            con.register("note_split_arrow", note_split_arrow)
            con.execute("CREATE TABLE note_split AS SELECT * FROM note_split_arrow")
            con.unregister("note_split_arrow")
        con.execute(SQL_PAIRS.format(scale=f"{weight_scale(settings.weighting)}.0"))
        pairs = dict(con.execute("SELECT split, COUNT(*) FROM pairs GROUP BY split").fetchall())
        queries = dict(con.execute("SELECT split, COUNT(DISTINCT query_id) FROM pairs GROUP BY split").fetchall())
        notes = dict(con.execute("SELECT split, COUNT(*) FROM note_split GROUP BY split").fetchall())
        return pairs, queries, notes

    pairs_by_split, queries_by_split, notes_by_split = stages.run("split", split)

    def write():
        tmp = out / f".pairs.parquet.tmp-{os.getpid()}"
        con.execute(f"""COPY (SELECT query_id, target_id, score, split FROM pairs ORDER BY a, rnk)
                        TO {_sql_str(str(tmp))} (FORMAT parquet, COMPRESSION zstd)""")
        digest = _sha256_file(tmp)
        os.replace(tmp, out / "pairs.parquet")
        return digest

    pairs_sha = stages.run("write", write)
    inputs = stages.run("hash-inputs", lambda: [
        {"path": str(f.resolve()), "bytes": f.stat().st_size, "sha256": _sha256_file(f)} for f in files])

    splits = ("train", "val", "test")
    summary = {
        "format_version": FORMAT_VERSION,
        "settings": {k: v for k, v in asdict(settings).items()
                     if k not in ("memory_limit", "temp_directory", "threads")},
        "inputs": inputs,
        "input_format": kind,
        "counts": {
            "events": int(n_events),
            "first_views": int(n_first_views),
            "users": int(n_users),
            "notes": int(n_notes),
            "co_occurrences": int(n_cooc),
            "scored_pairs": int(n_scored),
            "candidate_pairs": int(n_candidates),
            "pairs": int(sum(pairs_by_split.values())),
            "pairs_by_split": {s: int(pairs_by_split.get(s, 0)) for s in splits},
            "query_notes_by_split": {s: int(queries_by_split.get(s, 0)) for s in splits},
            "notes_by_split": {s: int(notes_by_split.get(s, 0)) for s in splits},
        },
        "outputs": {"pairs.parquet": {"sha256": pairs_sha}},
        "engine": engine,
        "timings_s": stages.timings,
    }
    tmp = out / f".mining_manifest.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, out / "mining_manifest.json")
    return summary
