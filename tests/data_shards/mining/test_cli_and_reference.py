"""`notellm2 data mine-pairs` end to end, the product against the benchmark's pandas reference,
and a tiny run of benchmarks/bench_mining.py so that it cannot rot."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from notellm2.data_shards.mining.mine import MiningSettings, mine_pairs
from notellm2.launcher.cli import main

from tests.helpers.bench_results import check_result, result_lines
from tests.helpers.paths import REPO
BENCH = os.path.join(REPO, "benchmarks", "bench_mining.py")
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import bench_mining  # noqa: E402


def _views(path, n_events=3000, n_users=150, n_notes=80, days=20, seed=0):
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n_users, n_events)
    notes = np.minimum(rng.zipf(1.6, n_events) - 1, n_notes - 1)
    ts = 1_700_000_000 + rng.integers(0, days * 86_400, n_events)
    pd.DataFrame({"user_id": users.astype(np.int64), "note_id": [f"note{n}" for n in notes],
                  "timestamp": ts}).to_parquet(path, index=False)
    return str(path)


def test_cli_mine_pairs_writes_outputs_and_logs_stages(tmp_path, capsys):
    views = _views(tmp_path / "views.parquet")
    out = tmp_path / "pairs"
    rc = main(["data", "mine-pairs", "--views", views, "--out", str(out), "--window-days", "3",
               "--top-k", "4", "--symmetric", "--max-views-per-user", "6", "--split-by", "hash",
               "--val-fraction", "0.1", "--test-fraction", "0.2", "--seed", "3", "--memory-limit", "256MB"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "mine-pairs: co-occurrence" in captured.err and "mine-pairs: write" in captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    manifest = json.loads((out / "mining_manifest.json").read_text())
    assert manifest["settings"] == {**manifest["settings"], "window_days": 3.0, "top_k": 4, "symmetric": True,
                                    "max_views_per_user": 6, "split_by": "hash", "seed": 3}
    pairs = pd.read_parquet(out / "pairs.parquet")
    assert summary["pairs_by_split"] == manifest["counts"]["pairs_by_split"]
    assert sum(summary["pairs_by_split"].values()) == len(pairs) > 0
    assert pairs.groupby("query_id").size().max() <= 4
    assert set(pairs.split) == {"train", "val", "test"}


def test_cli_reports_bad_input_and_settings(tmp_path, capsys):
    views = tmp_path / "v.csv"
    views.write_text("user,note_id,timestamp\nu,a,1\n")
    assert main(["data", "mine-pairs", "--views", str(views), "--out", str(tmp_path / "o")]) == 2
    assert "v.csv: missing column(s) ['user_id']" in capsys.readouterr().err
    good = _views(tmp_path / "good.parquet", n_events=50)
    assert main(["data", "mine-pairs", "--views", good, "--out", str(tmp_path / "o"), "--top-k", "0"]) == 2
    assert "--top-k: 0: must be an integer >= 1" in capsys.readouterr().err  # refused by the parser


@pytest.mark.parametrize("kw", [
    dict(),
    dict(weighting=False, symmetric=True, top_k=3),
    dict(max_views_per_user=2, window_days=2.0, min_score=0.02, max_score=0.3),
    dict(split_by="hash", seed=7, val_fraction=0.2, test_fraction=0.3, weighting=False, min_score=2),
    dict(split_by="hash", seed=1, val_fraction=0.2, test_fraction=0.3, pair_split="both", symmetric=True),
])
def test_product_equals_pandas_reference(tmp_path, kw):
    views = _views(tmp_path / "views.parquet", seed=len(kw))
    s = MiningSettings(memory_limit="256MB", **kw)
    mine_pairs(views, tmp_path / "duck", s)
    n = bench_mining.mine_pairs_pandas(views, str(tmp_path / "ref.parquet"), s)
    got = pd.read_parquet(tmp_path / "duck" / "pairs.parquet").astype(object)
    ref = pd.read_parquet(tmp_path / "ref.parquet").astype(object)
    assert n == len(got) > 0
    pd.testing.assert_frame_equal(got, ref, check_exact=True)


def test_cli_spark_engine_options(tmp_path, capsys, spark_session):
    views = _views(tmp_path / "views.parquet", n_events=400, n_users=40, n_notes=30)
    # In-process, the CLI reuses the running session (and leaves it running).
    rc = main(["data", "mine-pairs", "--views", views, "--out", str(tmp_path / "s"), "--engine", "spark",
               "--spark-master", "local[1]", "--spark-conf", "spark.sql.shuffle.partitions=3",
               "--pair-split", "both", "--split-by", "hash", "--test-fraction", "0.3", "--quiet"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    manifest = json.loads((tmp_path / "s" / "mining_manifest.json").read_text())
    assert manifest["engine"]["name"] == "spark" and manifest["engine"]["shuffle_partitions"] == "3"
    assert manifest["settings"]["pair_split"] == "both" and "engine" not in manifest["settings"]
    assert json.loads(out.out.strip().splitlines()[-1])["pairs_dropped_cross_split"] == \
        manifest["counts"]["pairs_dropped_cross_split"] > 0
    assert spark_session.conf.get("spark.sql.shuffle.partitions") == "1"  # restored after the run
    assert main(["data", "mine-pairs", "--views", views, "--out", str(tmp_path / "d"), "--pair-split", "both",
                 "--split-by", "hash", "--test-fraction", "0.3", "--quiet"]) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "s" / "pairs.parquet"),
                                  pd.read_parquet(tmp_path / "d" / "pairs.parquet"))
    capsys.readouterr()
    assert main(["data", "mine-pairs", "--views", views, "--out", str(tmp_path / "x"), "--engine", "spark",
                 "--spark-conf", "no-equals-sign"]) == 2
    assert "--spark-conf 'no-equals-sign': expected key=value" in capsys.readouterr().err


@pytest.mark.timeout(300)
def test_benchmark_runs_at_tiny_size():
    proc = subprocess.run([sys.executable, BENCH, "--events", "20000", "--users", "2000", "--notes", "1000",
                           "--pandas-events", "6000", "--memory-limit", "256MB", "--sub-repeat", "1"],
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = result_lines(proc.stdout)
    assert [r["name"] for r in results] == ["mining_time_s", "mining_peak_rss_gb", "mining_speedup_vs_pandas"]
    for r in results:
        assert set(r) == {"name", "figure", "bound_or_baseline", "ratio", "target", "pass"}
    assert "outputs identical: True" in proc.stdout
    time_s, rss, speedup = results
    # time and memory against their default bounds (60 s, 4 GB): ratio = figure / bound, pass = ratio <= 1
    assert (time_s["bound_or_baseline"], rss["bound_or_baseline"]) == (60.0, 4.0)
    assert time_s["target"].startswith("<= 60.0 s for 20000 events") and rss["target"] == "<= 4.0 GB"
    check_result(time_s, "<=", 1.0, digits=2, ratio_digits=3)
    check_result(rss, "<=", 1.0, digits=3, ratio_digits=3)
    # the speed-up is its own figure and ratio (pandas seconds / DuckDB seconds; the baseline is pandas' time)
    assert speedup["target"].startswith(">= 5.0x on ")
    check_result(speedup, ">=", 5.0, digits=2, ratio_digits=2, ratio=speedup["figure"])


def test_output_does_not_depend_on_thread_count(tmp_path):
    views = _views(tmp_path / "views.parquet", n_events=20000, n_users=800, n_notes=300, seed=5)
    digests = []
    for threads in (1, 2):
        s = MiningSettings(threads=threads, memory_limit="256MB", test_fraction=0.2)
        summary = mine_pairs(views, tmp_path / f"t{threads}", s)
        assert summary["engine"]["threads"] == threads
        digests.append((tmp_path / f"t{threads}" / "pairs.parquet").read_bytes())
    assert digests[0] == digests[1]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_spills_to_disk_under_a_small_memory_limit_with_identical_output(tmp_path):
    import threading

    views = str(tmp_path / "views.parquet")
    bench_mining.generate_views(views, events=300_000, users=30_000, notes=20_000, days=30, seed=1)
    mine_pairs(views, tmp_path / "roomy", MiningSettings(memory_limit="1GB"))
    spill = tmp_path / "spill"
    spill.mkdir()
    peak, stop = [0], threading.Event()

    def watch():
        while not stop.is_set():
            total = 0
            for root, _, files in os.walk(spill):
                for f in files:
                    try:
                        total += os.path.getsize(os.path.join(root, f))
                    except OSError:
                        pass
            peak[0] = max(peak[0], total)
            stop.wait(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        mine_pairs(views, tmp_path / "tight", MiningSettings(memory_limit="60MB", temp_directory=str(spill)))
    finally:
        stop.set()
        watcher.join()
    assert peak[0] > 1_000_000, "expected DuckDB to spill to the temp directory"
    assert (tmp_path / "tight" / "pairs.parquet").read_bytes() == (tmp_path / "roomy" / "pairs.parquet").read_bytes()


@pytest.mark.timeout(400)
def test_spark_benchmark_runs_at_tiny_size(tmp_path):
    import shutil

    if shutil.which("java") is None:
        pytest.skip("no Java runtime")
    proc = subprocess.run([sys.executable, BENCH, "--engine", "spark", "--events", "3000", "--users", "300",
                           "--notes", "200", "--memory-limit", "256MB", "--spark-driver-memory", "1g",
                           "--spark-conf", "spark.sql.shuffle.partitions=2", "spark.sql.adaptive.enabled=false",
                           "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=380)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = result_lines(proc.stdout)
    assert [r["name"] for r in results] == ["mining_spark_vs_duckdb_time", "mining_spark_vs_duckdb_peak_memory_gb"]
    assert "outputs identical: True; manifest counts identical: True" in proc.stdout
    # recorded figures (no target): Spark's against DuckDB's, passing on identical outputs alone
    check_result(results[0], None, None, digits=2, ratio_digits=2, also=True)
    check_result(results[1], None, None, digits=3, ratio_digits=2, also=True)
    # The JVM is counted: Spark's process tree holds far more than the Python driver alone.
    assert results[1]["figure"] > 0.3, results[1]
    assert "spark.sql.shuffle.partitions=2" in proc.stdout and "spark.driver.memory=1g" in proc.stdout
