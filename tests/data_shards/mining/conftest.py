"""One real Spark session (local[2]) per test module, shared by the tests that mine with Spark.

Settings for small inputs: one shuffle partition, no adaptive re-planning and no code generation
(compiling each query's Java costs more than running it on a hand-built log; the rules' results
do not depend on either). Tests that need more partitions set them through MiningSettings.spark_conf.
"""
from __future__ import annotations

import shutil

import pytest

SMALL_INPUT_CONF = {
    "spark.sql.shuffle.partitions": "1",
    "spark.sql.adaptive.enabled": "false",
    "spark.sql.codegen.wholeStage": "false",
    "spark.sql.codegen.factoryMode": "NO_CODEGEN",
    "spark.default.parallelism": "2",
}


def pytest_configure(config):
    # pyspark 4.3 warns on import that it "does not yet fully support pandas >= 3.0.0"; the engine
    # exchanges no pandas objects with Spark (Parquet files only).
    config.addinivalue_line("filterwarnings", "ignore:PySpark does not yet fully support pandas:FutureWarning")


@pytest.fixture(scope="module")
def spark_session(tmp_path_factory):
    if shutil.which("java") is None:
        pytest.skip("no Java runtime (scripts/setup.sh installs openjdk-17-jre-headless)")
    pyspark = pytest.importorskip("pyspark")
    from pyspark.sql import SparkSession

    assert pyspark.__version__.startswith("4."), pyspark.__version__
    b = (SparkSession.builder.master("local[2]").appName("notellm2-tests")
         .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
         .config("spark.local.dir", str(tmp_path_factory.mktemp("spark-local")))
         .config("spark.driver.memory", "1g"))
    for k, v in SMALL_INPUT_CONF.items():
        b = b.config(k, v)
    spark = b.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    yield spark
    spark.stop()


@pytest.fixture(params=["duckdb", "spark"])
def engine(request):
    """(engine name, SparkSession or None): a test taking it runs once per engine."""
    if request.param == "spark":
        return "spark", request.getfixturevalue("spark_session")
    return "duckdb", None
