"""DuckDB and Spark give the same pairs, note splits and manifest counts on a 200k-event synthetic
log, with Spark on local[2] and 1 or 4 shuffle partitions (docs/mining.md, "Engines")."""
from __future__ import annotations

import json
import os
import sys

import pandas as pd
import pytest

from notellm2.data_shards.mining.mine import MiningSettings, mine_pairs

from tests.helpers.paths import REPO
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import bench_mining  # noqa: E402


@pytest.fixture(scope="module")
def views(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cross") / "views.parquet")
    shape = bench_mining.generate_views(path, events=200_000, users=20_000, notes=10_000, days=30, seed=3)
    assert shape["max_views_per_user"] > 50  # heavy users, so the cap is exercised
    return path


@pytest.mark.timeout(900)
@pytest.mark.parametrize("kw", [
    dict(),  # time split, pair split "either", weighted
    dict(split_by="hash", seed=5, pair_split="both", symmetric=True, min_score=0.01, max_views_per_user=7,
         val_fraction=0.1, test_fraction=0.2),
])
def test_duckdb_and_spark_agree_whatever_the_partition_count(tmp_path, views, spark_session, kw):
    duck = mine_pairs(views, tmp_path / "duckdb", MiningSettings(memory_limit="512MB", **kw))
    expect = {name: pd.read_parquet(tmp_path / "duckdb" / name) for name in ("pairs.parquet", "note_split.parquet")}
    assert duck["counts"]["pairs"] > 20_000
    if kw.get("pair_split") == "both":
        assert duck["counts"]["pairs_dropped_cross_split"] > 0
    for partitions in (1, 4):
        out = tmp_path / f"spark{partitions}"
        conf = {"spark.sql.shuffle.partitions": str(partitions), "spark.default.parallelism": str(partitions),
                # whole-stage code generation back on: the path a real run takes
                "spark.sql.codegen.wholeStage": "true", "spark.sql.codegen.factoryMode": "FALLBACK"}
        spark = mine_pairs(views, out, MiningSettings(engine="spark", spark_conf=conf, **kw), spark=spark_session)
        assert spark["engine"]["shuffle_partitions"] == str(partitions)
        for name, frame in expect.items():
            pd.testing.assert_frame_equal(pd.read_parquet(out / name), frame, check_exact=True)
        assert spark["counts"] == duck["counts"]
        assert spark["settings"] == duck["settings"] and spark["inputs"] == duck["inputs"]
        # The file itself does not depend on the partition count either.
        if partitions == 4:
            assert (out / "pairs.parquet").read_bytes() == (tmp_path / "spark1" / "pairs.parquet").read_bytes()
    assert json.loads((tmp_path / "spark4" / "mining_manifest.json").read_text())["counts"] == duck["counts"]
