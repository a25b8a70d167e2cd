"""Benchmark of `notellm2 data mine-pairs`: DuckDB against a plain pandas implementation, or
(`--engine spark`) the Spark engine against DuckDB on the same log.

    .venv/bin/python benchmarks/bench_mining.py                  # full: 10M events, 1M users, 500k notes
    .venv/bin/python benchmarks/bench_mining.py --events 20000 --users 2000 --notes 1000 --pandas-events 5000
    .venv/bin/python benchmarks/bench_mining.py --engine spark   # 10M events, Spark local[2] vs DuckDB

Synthetic traffic (numpy, written to Parquet in a temp dir; generation time not counted):
users with log-normal activity (median a few views, a handful with thousands), notes with Zipf
popularity, timestamps uniform over `--days` days, user ids int64, note ids 16-hex strings.

Figures, each measured in a fresh subprocess (peak RSS = that process's ru_maxrss):
  1. DuckDB mining of all events: time vs the 60 s bound, peak RSS vs the 4 GB bound.
  2. DuckDB and pandas on the same sub-sample (all events of a random subset of users, about
     `--pandas-events` events), `--sub-repeat` times each, interleaved, fastest of each: speed
     ratio pandas/DuckDB vs the 5x target; the two outputs must be IDENTICAL (same rows, order,
     scores bit for bit, splits), asserted here.
With `--engine spark`: DuckDB and Spark (`--spark-master`, default local[2], with
spark.driver.memory and spark.local.dir set) each mine all events in a fresh subprocess; peak
memory is the sampled sum of RSS over the worker and its children (the JVM), CPU seconds include
the JVM's. The two engines' pairs.parquet and note_split.parquet must be identical (asserted).
Ends with one `RESULT {json}` line per figure.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from notellm2.data_shards.mining.mine import (MiningSettings, hash_split_of, split_counts,  # noqa: E402
                                weight_scale)
from notellm2.data_shards.mining.mine import parse_spark_conf  # noqa: E402

DAY = 86_400
T0 = 1_700_000_000


# ------------------------------------------------------------------------------------------
# Synthetic view log
# ------------------------------------------------------------------------------------------

def generate_views(path: str, events: int, users: int, notes: int, days: int, seed: int,
                   zipf_s: float = 1.0, sigma: float = 1.55) -> dict:
    """Write a synthetic view log to `path` (Parquet); returns its shape."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    users = min(users, events)
    # Views per user: log-normal, at least 1, rescaled to `events` in total.
    raw = rng.lognormal(mean=0.0, sigma=sigma, size=users)
    counts = np.maximum(1, np.floor(raw / raw.sum() * events)).astype(np.int64)
    diff = events - int(counts.sum())
    if diff > 0:  # hand the remainder out proportionally to activity
        extra = rng.multinomial(diff, raw / raw.sum())
        counts += extra
    elif diff < 0:  # take views back from users with more than one
        while diff < 0:
            idx = np.flatnonzero(counts > 1)
            take = rng.choice(idx, size=min(-diff, idx.size), replace=False)
            counts[take] -= 1
            diff += take.size
    user_ids = rng.choice(np.iinfo(np.int64).max, size=users, replace=False).astype(np.int64)
    user_col = np.repeat(user_ids, counts)
    # Note popularity: Zipf over ranks, ranks shuffled against ids.
    weights = 1.0 / np.arange(1, notes + 1, dtype=np.float64) ** zipf_s
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    rank = np.searchsorted(cdf, rng.random(events), side="right")
    perm = rng.permutation(notes)
    note_idx = perm[np.minimum(rank, notes - 1)]
    note_names = np.array([f"{x:016x}" for x in rng.choice(2**62, size=notes, replace=False)], dtype=object)
    ts = T0 + rng.integers(0, days * DAY, size=events, dtype=np.int64)
    order = rng.permutation(events)  # logs are not sorted by user
    # Dictionary-encoded note ids keep generation fast; readers see plain strings.
    note_col = pa.DictionaryArray.from_arrays(pa.array(note_idx[order].astype(np.int32)),
                                              pa.array(note_names, type=pa.string()))
    table = pa.table({"user_id": pa.array(user_col[order]), "note_id": note_col,
                      "timestamp": pa.array(ts[order])})
    pq.write_table(table, path, row_group_size=1 << 20)
    return {"events": int(events), "users": int(users), "notes": int(notes),
            "median_views_per_user": float(np.median(counts)), "max_views_per_user": int(counts.max()),
            "users_over_1000_views": int((counts > 1000).sum())}


def subsample_users(src: str, dst: str, target_events: int, seed: int) -> int:
    """All events of a random subset of users, about `target_events` in total."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(src)
    users = pc.unique(table.column("user_id")).to_numpy()
    frac = min(1.0, target_events / table.num_rows)
    rng = np.random.default_rng(seed + 1)
    keep = rng.choice(users, size=max(1, int(round(users.size * frac))), replace=False)
    sub = table.filter(pc.is_in(table.column("user_id"), value_set=pa.array(keep)))
    pq.write_table(sub, dst, row_group_size=1 << 20)
    return sub.num_rows


# ------------------------------------------------------------------------------------------
# Plain pandas reference of the same rules (lives here, not in the product)
# ------------------------------------------------------------------------------------------

def mine_pairs_pandas(views_path: str, out_path: str, s: MiningSettings) -> int:
    import pandas as pd

    df = pd.read_parquet(views_path, columns=["user_id", "note_id", "timestamp"])
    df["note_id"] = df["note_id"].astype(str)
    df["timestamp"] = df["timestamp"].astype("int64")
    # A user's first view of each note; N_u distinct notes; weights in 2^-40 units.
    first = df.groupby(["user_id", "note_id"], sort=False, as_index=False)["timestamp"].min()
    n_u = first.groupby("user_id").size()
    scale = weight_scale(s.weighting)
    if s.weighting:  # exact integer division, as in the SQL
        w_u = scale // n_u.to_numpy(np.int64)
    else:
        w_u = np.ones(len(n_u), dtype=np.int64)
    first["w"] = first["user_id"].map(pd.Series(w_u, index=n_u.index))
    first = first.sort_values(["user_id", "timestamp", "note_id"], kind="stable").reset_index(drop=True)
    u = first["user_id"].to_numpy()
    t = first["timestamp"].to_numpy()
    n = first["note_id"].to_numpy()
    w = first["w"].to_numpy()
    parts = []
    for k in range(1, s.max_views_per_user + 1):
        if k >= len(first):
            break
        same = u[k:] == u[:-k]
        if not same.any():
            break
        m = same & (t[k:] - t[:-k] <= s.window_seconds)
        parts.append(pd.DataFrame({"a": n[:-k][m], "b": n[k:][m], "w": w[:-k][m]}))
    co = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({"a": [], "b": [], "w": []})
    scores = co.groupby(["a", "b"], as_index=False)["w"].sum().rename(columns={"w": "units"})
    if s.symmetric:
        rev = scores.rename(columns={"a": "b", "b": "a"})
        scores = pd.concat([scores, rev], ignore_index=True).groupby(["a", "b"], as_index=False)["units"].sum()
    value = scores["units"].astype(np.float64) / float(scale)
    keep = np.ones(len(scores), dtype=bool)
    if s.min_score is not None:
        keep &= value >= s.min_score
    if s.max_score is not None:
        keep &= value <= s.max_score
    scores = scores[keep]
    scores = scores.sort_values(["a", "units", "b"], ascending=[True, False, True], kind="stable")
    top = scores[scores.groupby("a").cumcount() < s.top_k]
    # Note splits.
    first_seen = df.groupby("note_id")["timestamp"].min().reset_index()
    if s.split_by == "time":
        first_seen = first_seen.sort_values(["timestamp", "note_id"], kind="stable").reset_index(drop=True)
        n_val, n_test = split_counts(len(first_seen), s.val_fraction, s.test_fraction)
        pos = np.arange(len(first_seen))
        lab = np.where(pos >= len(first_seen) - n_test, "test",
                       np.where(pos >= len(first_seen) - n_test - n_val, "val", "train"))
    else:
        lab = np.array([hash_split_of(x, s) for x in first_seen["note_id"]], dtype=object)
    split_of = pd.Series(lab, index=first_seen["note_id"].to_numpy())
    qa = top["a"].map(split_of).to_numpy()
    tb = top["b"].map(split_of).to_numpy()
    if s.pair_split == "both":
        split = np.where(qa == tb, qa, None)
    else:
        split = np.where((qa == "test") | (tb == "test"), "test",
                         np.where((qa == "val") | (tb == "val"), "val", "train"))
    out = pd.DataFrame({"query_id": top["a"].to_numpy(), "target_id": top["b"].to_numpy(),
                        "score": top["units"].to_numpy().astype(np.float64) / float(scale),
                        "split": split})
    out = out[out["split"].notna()].reset_index(drop=True)
    out.to_parquet(out_path, index=False)
    return len(out)


# ------------------------------------------------------------------------------------------
# Workers (one subprocess per measured run) and the driver
# ------------------------------------------------------------------------------------------

def _settings_from(args) -> MiningSettings:
    return MiningSettings(window_days=args.window_days, top_k=args.top_k,
                          max_views_per_user=args.max_views_per_user, symmetric=args.symmetric,
                          weighting=not args.no_weighting, memory_limit=args.memory_limit)


def _spark_conf(args, work: str) -> list[str]:
    conf = {"spark.driver.memory": args.spark_driver_memory, "spark.local.dir": os.path.join(work, "spark-local"),
            "spark.sql.shuffle.partitions": "8", "spark.ui.enabled": "false"}
    conf.update(parse_spark_conf(args.spark_conf))
    return [f"{k}={v}" for k, v in conf.items()]


class _MemorySampler:
    """Peak of the summed RSS of this process and all its descendants (the JVM of pyspark), and
    the descendants' CPU seconds, sampled every `interval` s in a thread."""

    def __init__(self, interval: float = 0.1):
        import threading

        import psutil

        self.me = psutil.Process()
        self.peak = 0
        self.child_cpu: dict[int, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.interval = interval

    def _loop(self):
        import psutil

        while not self.stop.is_set():
            total = 0
            for p in [self.me] + self.me.children(recursive=True):
                try:
                    total += p.memory_info().rss
                    if p.pid != self.me.pid:
                        t = p.cpu_times()
                        self.child_cpu[p.pid] = t.user + t.system
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self.stop.wait(self.interval)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def _worker(args) -> None:
    s = _settings_from(args)
    t0 = time.perf_counter()
    sampler = _MemorySampler().__enter__()
    if args.worker in ("duckdb", "spark"):
        from notellm2.data_shards.mining.mine import mine_pairs

        if args.worker == "spark":
            s.engine, s.spark_master = "spark", args.spark_master
            s.spark_conf = parse_spark_conf(args.spark_conf)
        # each repeat mines afresh: a finished mining of the same log and settings would be reused as it is
        shutil.rmtree(args.out, ignore_errors=True)
        summary = mine_pairs(args.views, args.out, s)
        pairs = summary["counts"]["pairs"]
        extra = {"co_occurrences": summary["counts"]["co_occurrences"], "timings_s": summary["timings_s"],
                 "counts": summary["counts"]}
    else:
        os.makedirs(args.out, exist_ok=True)
        pairs = mine_pairs_pandas(args.views, os.path.join(args.out, "pairs.parquet"), s)
        extra = {}
    seconds = time.perf_counter() - t0
    sampler.__exit__(None, None, None)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    rss = usage.ru_maxrss * 1024  # Linux: kB
    # CPU seconds of all threads since the process started (imports included: about 0.5 s), plus
    # those of child processes (the JVM) as last sampled.
    cpu = usage.ru_utime + usage.ru_stime + sum(sampler.child_cpu.values())
    print("WORKER " + json.dumps({"seconds": seconds, "cpu_seconds": cpu, "peak_rss_bytes": rss,
                                  "peak_tree_rss_bytes": max(sampler.peak, rss),
                                  "pairs": pairs, "load_avg_1min": os.getloadavg()[0], **extra}))


def _run_worker(kind: str, views: str, out: str, args) -> dict:
    """The fastest of `--repeat` runs, each in a fresh process."""
    runs = [_run_worker_once(kind, views, out, args) for _ in range(max(1, args.repeat))]
    return min(runs, key=lambda r: r["seconds"])


def _run_interleaved(views: str, out_duck: str, out_pandas: str, args) -> tuple[dict, dict]:
    """DuckDB, pandas, DuckDB, pandas, ...: the fastest of each, so that a neighbour's burst of
    load on a shared machine does not land on one side only."""
    duck, pand = [], []
    for _ in range(max(1, args.sub_repeat)):
        duck.append(_run_worker_once("duckdb", views, out_duck, args))
        pand.append(_run_worker_once("pandas", views, out_pandas, args))
    key = lambda r: r["seconds"]  # noqa: E731
    return min(duck, key=key), min(pand, key=key)


def _run_worker_once(kind: str, views: str, out: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--views", views, "--out", out,
           "--window-days", str(args.window_days), "--top-k", str(args.top_k),
           "--max-views-per-user", str(args.max_views_per_user), "--memory-limit", args.memory_limit]
    if args.symmetric:
        cmd.append("--symmetric")
    if args.no_weighting:
        cmd.append("--no-weighting")
    if kind == "spark":
        cmd += ["--spark-master", args.spark_master, "--spark-conf", *args.spark_conf]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} worker failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("WORKER ")][-1]
    return json.loads(line[len("WORKER "):])


def _result(name, figure, bound, ratio, target, ok) -> None:
    print("RESULT " + json.dumps({"name": name, "figure": figure, "bound_or_baseline": bound,
                                  "ratio": ratio, "target": target, "pass": bool(ok)}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=10_000_000)
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--notes", type=int, default=500_000)
    p.add_argument("--days", type=int, default=30)
    p.add_argument("--pandas-events", type=int, default=1_000_000,
                   help="size of the common sub-sample mined by both DuckDB and pandas")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--window-days", type=float, default=7.0)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--max-views-per-user", type=int, default=MiningSettings.max_views_per_user)
    p.add_argument("--symmetric", action="store_true")
    p.add_argument("--no-weighting", action="store_true")
    p.add_argument("--memory-limit", default=MiningSettings.memory_limit)
    p.add_argument("--time-bound-s", type=float, default=60.0)
    p.add_argument("--rss-bound-gb", type=float, default=4.0)
    p.add_argument("--speedup-target", type=float, default=5.0)
    p.add_argument("--repeat", type=int, default=1,
                   help="run the full-size mining this many times and keep the fastest (shared machines)")
    p.add_argument("--sub-repeat", type=int, default=3,
                   help="DuckDB and pandas runs on the sub-sample, interleaved; the fastest of each counts")
    p.add_argument("--workdir", help="keep the generated data here instead of a temp dir")
    p.add_argument("--engine", choices=["duckdb", "spark"], default="duckdb",
                   help="duckdb: DuckDB vs pandas (default); spark: Spark vs DuckDB on all events")
    p.add_argument("--spark-master", default="local[2]")
    p.add_argument("--spark-driver-memory", default="6g")
    p.add_argument("--spark-conf", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="extra Spark configuration (after spark.driver.memory, spark.local.dir, "
                        "spark.sql.shuffle.partitions=8)")
    p.add_argument("--worker", choices=["duckdb", "pandas", "spark"], help=argparse.SUPPRESS)
    p.add_argument("--views", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0

    import pandas as pd

    tmp_ctx = tempfile.TemporaryDirectory(prefix="bench_mining_") if not args.workdir else None
    work = args.workdir or tmp_ctx.name
    os.makedirs(work, exist_ok=True)
    try:
        full = os.path.join(work, "views.parquet")
        t0 = time.perf_counter()
        shape = generate_views(full, args.events, args.users, args.notes, args.days, args.seed)
        print(f"generated {shape} in {time.perf_counter() - t0:.1f} s (not counted)", flush=True)
        if args.engine == "spark":
            return _spark_vs_duckdb(full, work, args)
        sub = os.path.join(work, "views_sub.parquet")
        n_sub = subsample_users(full, sub, args.pandas_events, args.seed)
        print(f"sub-sample for the pandas comparison: {n_sub} events", flush=True)

        big = _run_worker("duckdb", full, os.path.join(work, "out_full"), args)
        print(f"duckdb, {args.events} events: {big['seconds']:.2f} s wall, {big['cpu_seconds']:.1f} s cpu, peak RSS "
              f"{big['peak_rss_bytes'] / 2**30:.2f} GiB, {big['co_occurrences']} co-occurrences, "
              f"{big['pairs']} pairs; stages {big['timings_s']}; machine load {big['load_avg_1min']:.1f} "
              f"on {os.cpu_count()} cores", flush=True)

        d_sub, p_sub = _run_interleaved(sub, os.path.join(work, "out_sub_duckdb"),
                                        os.path.join(work, "out_sub_pandas"), args)
        a = pd.read_parquet(os.path.join(work, "out_sub_duckdb", "pairs.parquet"))
        b = pd.read_parquet(os.path.join(work, "out_sub_pandas", "pairs.parquet"))
        a = a.astype({"query_id": object, "target_id": object, "split": object})
        b = b.astype({"query_id": object, "target_id": object, "split": object})
        identical = (list(a.columns) == list(b.columns) and len(a) == len(b)
                     and all((a[c].to_numpy() == b[c].to_numpy()).all() for c in a.columns))
        speedup = p_sub["seconds"] / d_sub["seconds"]
        print(f"sub-sample {n_sub} events: duckdb {d_sub['seconds']:.2f} s wall ({d_sub['cpu_seconds']:.1f} s cpu), "
              f"pandas {p_sub['seconds']:.2f} s wall ({p_sub['cpu_seconds']:.1f} s cpu, "
              f"peak RSS {p_sub['peak_rss_bytes'] / 2**30:.2f} GiB), speed-up {speedup:.1f}x wall, "
              f"{p_sub['cpu_seconds'] / d_sub['cpu_seconds']:.1f}x cpu; "
              f"outputs identical: {identical} ({len(a)} vs {len(b)} pairs)", flush=True)
        assert identical, "DuckDB and pandas outputs differ on the common sub-sample"

        gb = big["peak_rss_bytes"] / 1e9
        _result("mining_time_s", round(big["seconds"], 2), args.time_bound_s,
                round(big["seconds"] / args.time_bound_s, 3), f"<= {args.time_bound_s} s for {args.events} events",
                big["seconds"] <= args.time_bound_s)
        _result("mining_peak_rss_gb", round(gb, 3), args.rss_bound_gb, round(gb / args.rss_bound_gb, 3),
                f"<= {args.rss_bound_gb} GB", gb <= args.rss_bound_gb)
        _result("mining_speedup_vs_pandas", round(speedup, 2), round(p_sub["seconds"], 2), round(speedup, 2),
                f">= {args.speedup_target}x on {n_sub} events, identical output",
                speedup >= args.speedup_target and identical)
    finally:
        if tmp_ctx is not None:
            tmp_ctx.cleanup()
    return 0


def _frames_equal(a, b) -> bool:
    a = a.astype({c: object for c in a.columns if c != "score"})
    b = b.astype({c: object for c in b.columns if c != "score"})
    return (list(a.columns) == list(b.columns) and len(a) == len(b)
            and all((a[c].to_numpy() == b[c].to_numpy()).all() for c in a.columns))


def _spark_vs_duckdb(full: str, work: str, args) -> int:
    import pandas as pd

    args.spark_conf = _spark_conf(args, work)
    duck = _run_worker("duckdb", full, os.path.join(work, "out_duckdb"), args)
    spark = _run_worker("spark", full, os.path.join(work, "out_spark"), args)
    identical = True
    for name in ("pairs.parquet", "note_split.parquet"):
        identical &= _frames_equal(pd.read_parquet(os.path.join(work, "out_duckdb", name)),
                                   pd.read_parquet(os.path.join(work, "out_spark", name)))
    same_counts = duck["counts"] == spark["counts"]
    for label, r in (("duckdb", duck), (f"spark {args.spark_master}", spark)):
        print(f"{label}, {args.events} events: {r['seconds']:.2f} s wall, {r['cpu_seconds']:.1f} s cpu "
              f"({r['cpu_seconds'] / args.events * 1e6:.2f} cpu-s per 1M events), peak memory (process tree) "
              f"{r['peak_tree_rss_bytes'] / 2**30:.2f} GiB, {r['pairs']} pairs; stages {r['timings_s']}; "
              f"machine load {r['load_avg_1min']:.1f} on {os.cpu_count()} cores", flush=True)
    print(f"spark conf: {' '.join(args.spark_conf)}")
    print(f"outputs identical: {identical}; manifest counts identical: {same_counts}", flush=True)
    assert identical and same_counts, "Spark and DuckDB outputs differ"
    t_ratio = spark["seconds"] / duck["seconds"]
    m_ratio = spark["peak_tree_rss_bytes"] / duck["peak_tree_rss_bytes"]
    _result("mining_spark_vs_duckdb_time", round(spark["seconds"], 2), round(duck["seconds"], 2), round(t_ratio, 2),
            f"recorded: Spark {args.spark_master} / DuckDB wall time on {args.events} events, identical output",
            identical and same_counts)
    _result("mining_spark_vs_duckdb_peak_memory_gb", round(spark["peak_tree_rss_bytes"] / 1e9, 3),
            round(duck["peak_tree_rss_bytes"] / 1e9, 3), round(m_ratio, 2),
            "recorded: Spark (driver JVM included) / DuckDB peak memory", identical and same_counts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
