"""The DuckDB engine of co-occurrence mining: sources, the connection, sinks (rules: mining_sql.py).

DuckDB spills joins, aggregations and sorts to `temp_directory` past `memory_limit`, so one
machine mines logs larger than its memory (the 10M-event benchmark: docs/mining.md).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from notellm2.data_shards.mining.mine import MiningError, MiningSettings, Stages, check_pairs, load_view_log
from notellm2.files import commit_file, sha256_file, temporary_name
from notellm2.data_shards.mining.sql import DUCKDB, SQL_OUT_NOTE_SPLIT, SQL_OUT_PAIRS, run_rules


def _sql_str(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def _source_sql(files: list[Path], kind: str) -> str:
    lst = "[" + ", ".join(_sql_str(str(f)) for f in files) + "]"
    if kind == "parquet":
        return f"read_parquet({lst}, union_by_name = true)"
    # note_id is text even when it looks like a number ("007" stays "007", as Spark reads it).
    return f"read_csv({lst}, header = true, union_by_name = true, types = {{'note_id': 'VARCHAR'}})"


def _connect(settings: MiningSettings, temp_dir: str):
    import duckdb

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = settings.threads or cores
    try:
        con = duckdb.connect(config={
            "memory_limit": settings.memory_limit,
            "temp_directory": temp_dir,
            "threads": int(threads),
            "preserve_insertion_order": False,
        })
    except duckdb.Error as e:  # the user's --memory-limit / --temp-dir / --threads
        raise MiningError(f"DuckDB refused the settings (--memory-limit {settings.memory_limit}, --temp-dir "
                          f"{temp_dir}, --threads {threads}): {_first_line(e)}") from None
    con.execute("SET enable_progress_bar = false")
    con.execute("SET TimeZone = 'UTC'")
    return con, int(threads)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class _DuckDB:
    """The adapter `mining_sql.run_rules` drives."""

    def __init__(self, con):
        self.con = con

    def create(self, name: str, sql: str) -> None:
        self.con.execute(f"CREATE TABLE {name} AS {sql}")

    def drop(self, name: str) -> None:
        self.con.execute(f"DROP TABLE {name}")

    def rows(self, sql: str) -> list:
        return self.con.execute(sql).fetchall()

    def scalar(self, sql: str):
        return self.rows(sql)[0][0]


def run_duckdb(views_path, files: list[Path], kind: str, out: Path, settings: MiningSettings, stages: Stages,
               spark=None):
    """Mine with DuckDB; returns (counts, outputs, engine info) for the manifest."""
    import duckdb

    own_tmp = settings.temp_directory is None
    if not own_tmp and os.path.exists(settings.temp_directory) and not os.path.isdir(settings.temp_directory):
        raise MiningError(f"--temp-dir {settings.temp_directory}: is a file; give a folder for DuckDB's spill files")
    spill_dir = tempfile.mkdtemp(prefix=".mining-spill-", dir=out) if own_tmp else settings.temp_directory
    # a --temp-dir that DuckDB creates is removed again, as the own spill folder is
    remove_spill = own_tmp or not os.path.exists(spill_dir)
    con = None
    try:
        con, threads = _connect(settings, spill_dir)
        db = _DuckDB(con)
        label = str(files[0]) if len(files) == 1 else f"{files[0].parent} ({len(files)} files)"

        def load():
            # Every DuckDB error while reading is about the user's file (an empty or ragged CSV, a file
            # that is not Parquet, a column of the wrong type): named in one line.
            try:
                con.execute(f"CREATE VIEW view_source AS SELECT * FROM {_source_sql(files, kind)}")
                cols = con.execute("DESCRIBE SELECT * FROM view_source").fetchall()
                return load_view_log(db, label, {c[0]: c[1] for c in cols}, DUCKDB, settings.timestamp_unit)
            except duckdb.Error as e:
                raise MiningError(f"{label}: cannot read the view log as {kind.upper()}: {_first_line(e)}") from None

        n_events = stages.run("read", load)
        counts = {"events": n_events, **run_rules(db, DUCKDB, settings, stages)}
        check_pairs(counts, label)

        def write():
            digests = {}
            for name, sql in (("pairs.parquet", SQL_OUT_PAIRS), ("note_split.parquet", SQL_OUT_NOTE_SPLIT)):
                tmp = temporary_name(str(out / name))
                try:
                    con.execute(f"COPY ({sql}) TO {_sql_str(tmp)} (FORMAT parquet, COMPRESSION zstd)")
                    digests[name] = {"sha256": sha256_file(tmp)}
                    commit_file(tmp, str(out / name))
                except BaseException:
                    if os.path.exists(tmp):
                        os.remove(tmp)
                    raise
            return digests

        outputs = stages.run("write", write)
        engine = {"name": "duckdb", "version": duckdb.__version__, "threads": threads,
                  "memory_limit": settings.memory_limit}
    finally:
        if con is not None:
            con.close()
        if remove_spill:
            shutil.rmtree(spill_dir, ignore_errors=True)
    return counts, outputs, engine
