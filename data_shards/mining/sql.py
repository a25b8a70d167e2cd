"""The co-occurrence rules as SQL, shared by the DuckDB and the Spark engine (docs/mining.md).

Every query below runs on both engines as written, given a table or view
`view_log(user_id, note_id STRING, ts BIGINT unix seconds)`. The few places where the two SQL
dialects differ are the fields of `Dialect`, and nowhere else:

* `note_index`, `user_index`: DuckDB numbers notes and users densely (ROW_NUMBER over the whole
  table) because integer join and sort keys are several times faster there; on Spark a window
  without PARTITION BY runs in ONE task, so Spark keeps the ids themselves as keys. Notes are
  numbered in note_id order, so "index ascending" and "note_id ascending" are the same order on
  both engines and the tie order of top-k does not change.
* `int_div`: exact integer division (`//` in DuckDB, `DIV` in Spark). Weights must be exact
  integers: a double quotient can round up to the next integer before FLOOR sees it.
* `sha256_hex`, `hex_to_bigint`: the hash split's functions (`sha256` / `sha2(x, 256)`, and hex
  text to an integer: a `0x` cast / `conv(x, 16, 10)`).
* `string_type`, `quote`: STRING vs VARCHAR, and "identifier" vs `identifier`.
* `timestamp_expr`: how each engine's column types of `timestamp` become unix seconds (numbers in
  the unit of `--timestamp-unit`).

`run_rules(db, ...)` executes the shared statements through a tiny adapter (`db.create`,
`db.drop`, `db.scalar`, `db.rows`) that each engine implements.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

# Fixed-point scale of the weights: one unit is 2^-40 of a score point (with weighting on; without
# it a unit is one co-occurring user, so counts never overflow).
WEIGHT_SCALE = 1 << 40
# The hash split uses the first 15 hex digits (60 bits) of sha256, so the bucket fits a signed BIGINT.
HASH_BITS = 60


@dataclass(frozen=True)
class Dialect:
    name: str
    note_index: str
    user_index: str
    int_div: str           # format with {a}, {b}
    sha256_hex: str        # format with {x}
    hex_to_bigint: str     # format with {x}
    string_type: str
    quote: str             # identifier quote character
    timestamp_expr: Callable[..., str]  # (type name, per_second=1) -> unix seconds

    def q(self, ident: str) -> str:
        return f"{self.quote}{ident}{self.quote}"


_INTEGER_TYPES_DUCKDB = ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT",
                         "UINTEGER", "UBIGINT")


def _duckdb_timestamp(type_name: str, per_second: int = 1) -> str:
    """Unix seconds from a `timestamp` column of DuckDB type `type_name`; numbers (and numeric text)
    are in units of 1/`per_second` s (--timestamp-unit: 1 s, 1000 ms, ...), datetimes carry their own."""
    t = type_name.upper()
    c = '"timestamp"'
    if t in _INTEGER_TYPES_DUCKDB:
        return f"CAST({c} AS BIGINT)" if per_second == 1 else f"(CAST({c} AS BIGINT) // {per_second})"
    if t in ("FLOAT", "DOUBLE") or t.startswith("DECIMAL"):
        return f"CAST(FLOOR({_per(c, per_second)}) AS BIGINT)"
    # Datetimes without a zone are UTC (the connection's TimeZone is set to UTC).
    if t.startswith("TIMESTAMP"):
        return f"CAST(FLOOR(epoch({c})) AS BIGINT)"
    if t == "DATE":
        return f"CAST(FLOOR(epoch(CAST({c} AS TIMESTAMP))) AS BIGINT)"
    if t == "VARCHAR":
        # Integer text is unix seconds, other numbers are floored, anything else must be a datetime.
        as_int = f"TRY_CAST({c} AS BIGINT)" if per_second == 1 else f"(TRY_CAST({c} AS BIGINT) // {per_second})"
        return (f"COALESCE({as_int}, CAST(FLOOR({_per(f'TRY_CAST({c} AS DOUBLE)', per_second)}) AS BIGINT), "
                f"CAST(FLOOR(epoch(TRY_CAST({c} AS TIMESTAMPTZ))) AS BIGINT))")
    return ""


def _per(expr: str, per_second: int) -> str:
    return expr if per_second == 1 else f"({expr} / {per_second})"


def _spark_timestamp(type_name: str, per_second: int = 1) -> str:
    t = type_name.lower()
    c = "`timestamp`"
    if t in ("tinyint", "smallint", "int", "bigint"):
        return f"CAST({c} AS BIGINT)" if per_second == 1 else f"(CAST({c} AS BIGINT) DIV {per_second})"
    if t in ("float", "double") or t.startswith("decimal"):
        return f"CAST(FLOOR({_per(c, per_second)}) AS BIGINT)"
    # The session time zone is UTC, so zone-less datetimes (timestamp_ntz, dates, text) are UTC.
    if t == "timestamp":
        return f"unix_seconds({c})"
    if t in ("timestamp_ntz", "date"):
        return f"unix_seconds(CAST({c} AS TIMESTAMP))"
    if t == "string":
        as_int = f"TRY_CAST({c} AS BIGINT)" if per_second == 1 else f"(TRY_CAST({c} AS BIGINT) DIV {per_second})"
        return (f"COALESCE({as_int}, CAST(FLOOR({_per(f'TRY_CAST({c} AS DOUBLE)', per_second)}) AS BIGINT), "
                f"unix_seconds(TRY_CAST({c} AS TIMESTAMP)))")
    return ""


DUCKDB = Dialect(
    name="duckdb",
    note_index="CAST(ROW_NUMBER() OVER (ORDER BY note_id) - 1 AS INTEGER)",
    user_index="CAST(ROW_NUMBER() OVER (ORDER BY user_id) AS INTEGER)",
    int_div="({a} // {b})",
    sha256_hex="sha256({x})",
    hex_to_bigint="CAST(('0x' || {x}) AS BIGINT)",
    string_type="VARCHAR",
    quote='"',
    timestamp_expr=_duckdb_timestamp,
)

SPARK = Dialect(
    name="spark",
    note_index="note_id",
    user_index="user_id",
    int_div="({a} DIV {b})",
    sha256_hex="sha2({x}, 256)",
    hex_to_bigint="CAST(conv({x}, 16, 10) AS BIGINT)",
    string_type="STRING",
    quote="`",
    timestamp_expr=_spark_timestamp,
)


# --------------------------------------------------------------------------------------------
# The statements. Each is a SELECT; the engine materialises it as a table under the given name.
# --------------------------------------------------------------------------------------------

def sql_view_log(d: Dialect, ts_expr: str) -> str:
    return (f"SELECT user_id, CAST(note_id AS {d.string_type}) AS note_id, {ts_expr} AS ts "
            f"FROM view_source")


# The largest |timestamp| in seconds a view log may hold: 1e11 s is the year 5138. Unix times in
# milliseconds (1.7e12 today), microseconds or nanoseconds are all past it, so a log in one of them
# mined as seconds (its 7-day window would be minutes) is refused, naming --timestamp-unit.
MAX_TIMESTAMP_SECONDS = 10 ** 11
SQL_TIMESTAMP_RANGE = "SELECT MIN(ts), MAX(ts) FROM view_log"

SQL_COUNT_EVENTS = """
SELECT COUNT(*), SUM(CASE WHEN user_id IS NULL OR note_id IS NULL OR ts IS NULL THEN 1 ELSE 0 END)
FROM view_log
"""


def sql_first_bad_row(d: Dialect, ts_expr: str) -> str:
    return (f"SELECT user_id, note_id, {d.q('timestamp')} FROM view_source "
            f"WHERE user_id IS NULL OR note_id IS NULL OR ({ts_expr}) IS NULL LIMIT 1")


def sql_notes(d: Dialect) -> str:
    return f"""
SELECT note_id, first_seen, {d.note_index} AS nidx
FROM (SELECT note_id, MIN(ts) AS first_seen FROM view_log GROUP BY note_id) s
"""


# A user's first view of each note (rule 1).
SQL_FIRST_VIEWS = """
SELECT v.user_id, n.nidx, MIN(v.ts) AS ts
FROM view_log v JOIN notes n ON v.note_id = n.note_id
GROUP BY v.user_id, n.nidx
"""


def sql_users(d: Dialect, weighting: bool) -> str:
    # N_u and the weight in units: floor(2^40 / N_u) by exact integer division, or 1.
    w = (f"CAST({d.int_div.format(a=f'CAST({WEIGHT_SCALE} AS BIGINT)', b='n_notes')} AS BIGINT)"
         if weighting else "CAST(1 AS BIGINT)")
    return f"""
SELECT user_id, n_notes, {d.user_index} AS uidx, {w} AS w
FROM (SELECT user_id, COUNT(*) AS n_notes FROM first_views GROUP BY user_id) s
"""


# rn: 1-based position of the view in the user's (ts, note_id) order. blk = floor(rn / M) puts
# the next M views of any view into its own block or the block after, which turns "the next M
# views" into an equality join (bounded work: at most 2M candidates per view, never n^2).
# Users with a single note cannot form a pair and are left out here.
SQL_EVENTS = """
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
SELECT e1.nidx AS a, e2.nidx AS b, CAST(SUM(e1.w) AS BIGINT) AS units
{co_occurrences}
GROUP BY e1.nidx, e2.nidx
"""

# Counted in a separate streaming pass: a COUNT(*) inside the aggregation above costs more.
SQL_COUNT_CO_OCCURRENCES = "SELECT COUNT(*) {co_occurrences}"

SQL_SYMMETRIC = """
SELECT a, b, CAST(SUM(units) AS BIGINT) AS units
FROM (SELECT a, b, units FROM pair_scores
      UNION ALL
      SELECT b AS a, a AS b, units FROM pair_scores) s
GROUP BY a, b
"""

# The note index follows note_id order, so "b ASC" is "partner note_id ascending".
SQL_TOP_K = """
SELECT a, b, units, rnk
FROM (SELECT a, b, units,
             ROW_NUMBER() OVER (PARTITION BY a ORDER BY units DESC, b ASC) AS rnk
      FROM {scores}
      WHERE {threshold}) s
WHERE rnk <= {top_k}
"""

# Time split: rank notes by (first_seen, note_id); the last n_test are test, the n_val before val.
# (A window over all notes: one task on Spark. Notes are few next to events; see docs/mining.md.)
SQL_SPLIT_TIME = """
SELECT nidx,
       CASE WHEN pos >= {n_notes} - {n_test} THEN 'test'
            WHEN pos >= {n_notes} - {n_test} - {n_val} THEN 'val'
            ELSE 'train' END AS split
FROM (SELECT nidx, ROW_NUMBER() OVER (ORDER BY first_seen, note_id) - 1 AS pos FROM notes) s
"""


def sql_split_hash(d: Dialect, seed: int, t_test: int, t_val: int) -> str:
    """Hash split per distinct note: bucket = first 60 bits of sha256("<seed>:<note_id>")."""
    keyed = "CONCAT(" + _sql_str(f"{int(seed)}:") + ", note_id)"
    digest = d.sha256_hex.format(x=keyed)
    h = d.hex_to_bigint.format(x=f"substr({digest}, 1, {HASH_BITS // 4})")
    return f"""
SELECT nidx,
       CASE WHEN bucket < {t_test} THEN 'test' WHEN bucket < {t_val} THEN 'val' ELSE 'train' END AS split
FROM (SELECT nidx, {h} AS bucket FROM notes) s
"""


# A pair's split. "either": test if either note is test, else val if either is val, else train.
# "both": the split of its two notes when they agree; NULL (dropped, and counted) when they do not.
PAIR_SPLIT_EXPR = {
    "either": """CASE WHEN qs.split = 'test' OR ts.split = 'test' THEN 'test'
            WHEN qs.split = 'val' OR ts.split = 'val' THEN 'val'
            ELSE 'train' END""",
    "both": "CASE WHEN qs.split = ts.split THEN qs.split END",
}

SQL_PAIRS = """
SELECT qn.note_id AS query_id,
       tn.note_id AS target_id,
       CAST(p.units AS DOUBLE) / CAST({scale} AS DOUBLE) AS score,
       {split_expr} AS split,
       p.a, p.rnk
FROM top_pairs p
JOIN notes qn ON qn.nidx = p.a
JOIN notes tn ON tn.nidx = p.b
JOIN note_split qs ON qs.nidx = p.a
JOIN note_split ts ON ts.nidx = p.b
"""

# What the engines write (ORDER BY: rows in query note_id order, then rank).
SQL_OUT_PAIRS = "SELECT query_id, target_id, score, split FROM pairs WHERE split IS NOT NULL ORDER BY a, rnk"
SQL_OUT_NOTE_SPLIT = ("SELECT n.note_id AS note_id, s.split AS split FROM note_split s "
                      "JOIN notes n ON n.nidx = s.nidx ORDER BY note_id")


def _sql_str(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def weight_scale(weighting: bool) -> int:
    """Units per score point: 2^40 with 1/N_u weighting, 1 without (a unit is then one user)."""
    return WEIGHT_SCALE if weighting else 1


def threshold_expr(min_score, max_score, weighting: bool) -> str:
    scale = f"CAST({weight_scale(weighting)} AS DOUBLE)"
    terms = []
    if min_score is not None:
        terms.append(f"CAST(units AS DOUBLE) / {scale} >= CAST({float(min_score)!r} AS DOUBLE)")
    if max_score is not None:
        terms.append(f"CAST(units AS DOUBLE) / {scale} <= CAST({float(max_score)!r} AS DOUBLE)")
    return " AND ".join(terms) or "1 = 1"


def hash_thresholds(val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """Integer bucket bounds: bucket < t_test is test, < t_val is val (bucket in [0, 2^60))."""
    full = 1 << HASH_BITS
    t_test = math.ceil(Fraction(test_fraction) * full)
    t_val = math.ceil(Fraction(test_fraction + val_fraction) * full)
    return t_test, t_val


def split_counts(n_notes: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(n_val, n_test) notes held out by the time split."""
    return int(n_notes * val_fraction), int(n_notes * test_fraction)


# --------------------------------------------------------------------------------------------
# The pipeline over an engine adapter.
# --------------------------------------------------------------------------------------------

def run_rules(db, d: Dialect, s, stages) -> dict:
    """Rules 1-9 from `view_log` to the tables `pairs` and `note_split`; returns the counts.

    `db`: create(name, select_sql), drop(name), scalar(sql), rows(sql) -> list of tuples.
    `s`: MiningSettings; `stages`: runs and times named steps.
    """
    # Drops come after the query that first reads a table's dependants: Spark materialises a
    # persisted table at its first use, and must not recompute it from the log after a drop.
    def users_and_views():
        db.create("notes", sql_notes(d))
        db.create("first_views", SQL_FIRST_VIEWS)
        db.create("users", sql_users(d, s.weighting))
        db.create("events", SQL_EVENTS.format(m=s.max_views_per_user))
        return db.rows("SELECT (SELECT COUNT(*) FROM notes), (SELECT COUNT(*) FROM users), "
                       "(SELECT SUM(n_notes) FROM users), (SELECT COUNT(*) FROM events)")[0]

    n_notes, n_users, n_first_views, _ = stages.run("first-views", users_and_views)

    def co_occurrence():
        db.drop("view_log")
        db.drop("first_views")
        co = SQL_CO_OCCURRENCES.format(m=s.max_views_per_user, window=s.window_seconds)
        n_co = db.scalar(SQL_COUNT_CO_OCCURRENCES.format(co_occurrences=co))
        db.create("pair_scores", SQL_PAIR_SCORES.format(co_occurrences=co))
        n_scored = db.scalar("SELECT COUNT(*) FROM pair_scores")
        db.drop("events")
        return n_scored, n_co

    n_scored, n_cooc = stages.run("co-occurrence", co_occurrence)

    def rank():
        scores = "pair_scores"
        if s.symmetric:
            db.create("pair_scores_sym", SQL_SYMMETRIC)
            scores = "pair_scores_sym"
        db.create("top_pairs", SQL_TOP_K.format(scores=scores, top_k=s.top_k,
                                                threshold=threshold_expr(s.min_score, s.max_score, s.weighting)))
        return db.scalar(f"SELECT COUNT(*) FROM {scores}")

    n_candidates = stages.run("rank", rank)

    def split():
        if s.split_by == "time":
            n_val, n_test = split_counts(n_notes, s.val_fraction, s.test_fraction)
            db.create("note_split", SQL_SPLIT_TIME.format(n_notes=n_notes, n_test=n_test, n_val=n_val))
        else:
            t_test, t_val = hash_thresholds(s.val_fraction, s.test_fraction)
            db.create("note_split", sql_split_hash(d, s.seed, t_test, t_val))
        db.create("pairs", SQL_PAIRS.format(scale=weight_scale(s.weighting), split_expr=PAIR_SPLIT_EXPR[s.pair_split]))
        by_split = db.rows("SELECT split, COUNT(*), COUNT(DISTINCT query_id) FROM pairs GROUP BY split")
        pairs = {k: n for k, n, _ in by_split if k is not None}
        dropped = sum(n for k, n, _ in by_split if k is None)
        queries = {k: q for k, _, q in by_split if k is not None}
        notes = dict(db.rows("SELECT split, COUNT(*) FROM note_split GROUP BY split"))
        return pairs, dropped, queries, notes

    pairs_by_split, dropped, queries_by_split, notes_by_split = stages.run("split", split)
    splits = ("train", "val", "test")
    return {
        "first_views": int(n_first_views),
        "users": int(n_users),
        "notes": int(n_notes),
        "co_occurrences": int(n_cooc),
        "scored_pairs": int(n_scored),
        "candidate_pairs": int(n_candidates),
        "pairs": int(sum(pairs_by_split.values())),
        "pairs_by_split": {k: int(pairs_by_split.get(k, 0)) for k in splits},
        "pairs_dropped_cross_split": int(dropped or 0),
        "query_notes_by_split": {k: int(queries_by_split.get(k, 0)) for k in splits},
        "notes_by_split": {k: int(notes_by_split.get(k, 0)) for k in splits},
    }
