"""The Spark engine of co-occurrence mining (`--engine spark`): the same SQL as DuckDB
(mining_sql.py, dialect SPARK), run through pyspark on `local[N]` or a cluster.

What is Spark-specific here, and why:
* each shared statement becomes a persisted (MEMORY_AND_DISK) temp view, computed once by the
  first query that reads it, so a later step reads it instead of recomputing it from the log;
* the session runs with `spark.sql.session.timeZone=UTC` (zone-less datetimes are UTC, as in
  DuckDB) and ANSI mode (an int64 overflow of a score sum is an error, not a wrap-around);
* output: executors write the globally sorted rows as Parquet parts into a staging folder
  (`temp_directory`, or a hidden folder inside --out, which suits local[N] or a shared mount);
  the driver then streams the parts, in partition order, into one pairs.parquet and one
  note_split.parquet with fixed row groups, so the files are the same whatever the partition
  count, and removes the staging folder.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from notellm2.data_shards.mining.mine import MiningError, MiningSettings, Stages, check_pairs, is_uri, load_view_log
from notellm2.files import commit_file, sha256_file, temporary_name
from notellm2.data_shards.mining.sql import SPARK, SQL_OUT_NOTE_SPLIT, SQL_OUT_PAIRS, run_rules

log = logging.getLogger("notellm2.mining")

# Runtime SQL settings the rules need (set on the session for the run, restored afterwards).
RULE_CONF = {"spark.sql.session.timeZone": "UTC", "spark.sql.ansi.enabled": "true"}
ROW_GROUP = 1 << 20


def build_session(settings: MiningSettings):
    """A SparkSession for `settings` (master, conf); under spark-submit its --master wins."""
    from notellm2.errors import require

    SparkSession = require("pyspark.sql", "spark").SparkSession

    b = SparkSession.builder.appName("notellm2-mine-pairs")
    under_submit = "PYSPARK_GATEWAY_PORT" in os.environ  # spark-submit started the JVM already
    if not under_submit:
        b = b.master(settings.spark_master)
    conf = dict(RULE_CONF)
    if settings.spark_master.startswith("local") and not under_submit:
        conf.update({"spark.ui.enabled": "false", "spark.ui.showConsoleProgress": "false"})
    conf.update({k: str(v) for k, v in settings.spark_conf.items()})
    for k, v in conf.items():
        b = b.config(k, v)
    try:
        return b.getOrCreate()
    except Exception as e:  # no Java, a bad master URL ...
        raise MiningError(f"--engine spark: cannot start Spark (master {settings.spark_master!r}): "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


class _Spark:
    """The adapter `mining_sql.run_rules` drives."""

    def __init__(self, spark):
        self.spark = spark
        self.frames = {}

    def create(self, name: str, sql: str) -> None:
        from pyspark import StorageLevel

        # Persisted, materialised by the first query that reads it (run_rules orders its drops so
        # that no table is dropped before its dependants were computed). The log itself is a
        # plain view: re-reading Parquet is cheaper than caching a copy of it.
        df = self.spark.sql(sql)
        if name != "view_log":
            df = df.persist(StorageLevel.MEMORY_AND_DISK)
        df.createOrReplaceTempView(name)
        self.frames[name] = df

    def drop(self, name: str) -> None:
        self.spark.catalog.dropTempView(name)
        df = self.frames.pop(name, None)
        if df is not None and df.is_cached:
            df.unpersist()

    def rows(self, sql: str) -> list:
        return [tuple(r) for r in self.spark.sql(sql).collect()]

    def scalar(self, sql: str):
        return self.rows(sql)[0][0]

    def close(self) -> None:
        for name in list(self.frames):
            self.drop(name)
        self.spark.catalog.dropTempView("view_source")


def _read_source(spark, views_path, files: list[Path], kind: str):
    paths = [f.resolve().as_uri() for f in files] or [str(views_path)]
    if kind == "csv":
        sep = "\t" if any(str(p).lower().endswith((".tsv", ".tsv.gz")) for p in paths) else ","
        # Every column is read as text (no inference pass over the log); the rules cast it.
        return spark.read.option("header", "true").option("sep", sep).csv(paths)
    return spark.read.option("mergeSchema", "true").parquet(*paths)


def _staging(out: Path, settings: MiningSettings) -> tuple[str, object, str]:
    """(URI executors write to, pyarrow filesystem, path on it) of the staging folder."""
    import uuid

    import pyarrow.fs as pafs

    name = f".spark-staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    base = settings.temp_directory
    if base is None:
        path = (out / name).resolve()
        return path.as_uri(), pafs.LocalFileSystem(), str(path)
    if is_uri(base):
        uri = base.rstrip("/") + "/" + name
        fs, path = pafs.FileSystem.from_uri(uri)
        return uri, fs, path
    path = (Path(base) / name).resolve()
    return path.as_uri(), pafs.LocalFileSystem(), str(path)


def _assemble(fs, part_dir: str, dst: Path, schema) -> str:
    """Concatenate the Parquet parts under `part_dir` in partition order into `dst` (atomic)."""
    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    infos = fs.get_file_info(pafs.FileSelector(part_dir))
    parts = sorted(i.path for i in infos if os.path.basename(i.path).startswith("part-")
                   and i.path.endswith(".parquet"))
    tmp = temporary_name(str(dst))
    buf, n = [], 0
    with pq.ParquetWriter(str(tmp), schema, compression="zstd") as writer:
        def flush(final=False):
            nonlocal buf, n
            table = pa.Table.from_batches(buf, schema=schema) if buf else schema.empty_table()
            while table.num_rows >= ROW_GROUP or (final and table.num_rows):
                writer.write_table(table.slice(0, ROW_GROUP))
                table = table.slice(ROW_GROUP)
            buf, n = table.to_batches(), table.num_rows

        for p in parts:
            with fs.open_input_file(p) as fh:
                for batch in pq.ParquetFile(fh).iter_batches(batch_size=65_536):
                    batch = pa.Table.from_batches([batch]).select(schema.names).cast(schema).combine_chunks()
                    buf.extend(batch.to_batches())
                    n += batch.num_rows
                    if n >= ROW_GROUP:
                        flush()
        flush(final=True)
    digest = sha256_file(tmp)
    commit_file(tmp, str(dst))
    return digest


def run_spark(views_path, files: list[Path], kind: str, out: Path, settings: MiningSettings, stages: Stages,
              spark=None):
    """Mine with Spark; returns (counts, outputs, engine info) for the manifest.

    `spark`: an existing session (kept running; the settings' spark_conf is applied to it at
    runtime where Spark allows); otherwise one is built from the settings and stopped at the end.
    """
    import pyarrow as pa

    if spark is None:  # a session already running in this process (a notebook, a test) is reused
        from notellm2.errors import require

        spark = require("pyspark.sql", "spark").SparkSession.getActiveSession()
    own = spark is None
    if own:
        spark = stages.run("spark-start", build_session, settings)
    previous = {k: spark.conf.get(k, None) for k in {**RULE_CONF, **settings.spark_conf}}
    for k, v in {**RULE_CONF, **({} if own else settings.spark_conf)}.items():
        try:
            spark.conf.set(k, str(v))
        except Exception as e:  # a static key on a running session
            log.warning("mine-pairs: cannot set %s on the running Spark session (%s)", k,
                        str(e).splitlines()[0])
    db = _Spark(spark)
    label = (str(files[0]) if len(files) == 1 else f"{files[0].parent} ({len(files)} files)") if files \
        else str(views_path)
    stage_uri, fs, stage_path = _staging(out, settings)
    try:
        def load():
            try:
                df = _read_source(spark, views_path, files, kind)
                types = dict(df.dtypes)
            except Exception as e:  # AnalysisException, Py4JJavaError: name the input
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise MiningError(f"{label}: cannot read the view log: {first}") from e
            df.createOrReplaceTempView("view_source")
            return load_view_log(db, label, types, SPARK, settings.timestamp_unit)

        n_events = stages.run("read", load)
        counts = {"events": n_events, **run_rules(db, SPARK, settings, stages)}
        check_pairs(counts, label)

        def write():
            schemas = {
                "pairs.parquet": (SQL_OUT_PAIRS, pa.schema([("query_id", pa.string()), ("target_id", pa.string()),
                                                           ("score", pa.float64()), ("split", pa.string())])),
                "note_split.parquet": (SQL_OUT_NOTE_SPLIT, pa.schema([("note_id", pa.string()),
                                                                     ("split", pa.string())])),
            }
            digests = {}
            for name, (sql, schema) in schemas.items():
                part_uri = f"{stage_uri}/{name}"
                spark.sql(sql).write.mode("overwrite").option("compression", "zstd").parquet(part_uri)
                digests[name] = {"sha256": _assemble(fs, f"{stage_path}/{name}", out / name, schema)}
            return digests

        outputs = stages.run("write", write)
        engine = {"name": "spark", "version": spark.version, "master": spark.sparkContext.master,
                  "default_parallelism": spark.sparkContext.defaultParallelism,
                  "shuffle_partitions": spark.conf.get("spark.sql.shuffle.partitions")}
    finally:
        try:
            fs.delete_dir(stage_path)
        except (FileNotFoundError, OSError):
            pass
        db.close()
        if own:
            spark.stop()
        else:
            for k, v in previous.items():
                if v is None:
                    spark.conf.unset(k)
                else:
                    spark.conf.set(k, v)
    return counts, outputs, engine
