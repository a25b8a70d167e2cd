import pytest

from tests.slurm.cluster import start_cluster, stop_cluster


@pytest.fixture(scope="session")
def slurm_cluster():
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        stop_cluster(cluster)
