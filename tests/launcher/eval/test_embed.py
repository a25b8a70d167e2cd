"""`notellm2 embed`: every note of a notes shard set exactly once, the same vectors on 1 or 2 ranks."""
import subprocess
import sys

import numpy as np
import pytest

from notellm2.launcher.eval.evaluate import load_embeddings
from tests.helpers.embed_setup import tiny_embed_setup
from tests.helpers.multirank import REPO, base_env, run_command


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_embed_setup(tmp_path_factory.mktemp("embed"))


def test_embed_one_rank_then_two_ranks_agree(setup):
    one = setup["root"] / "emb1"
    out = subprocess.run([sys.executable, "-m", "notellm2.launcher", "embed", "--config", setup["config"], "--out", str(one),
                          "--batch-size", "4"], capture_output=True, text=True, cwd=REPO, env=base_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    ids1, emb1 = load_embeddings(str(one))
    assert len(ids1) == setup["notes"] == len(set(ids1))
    assert np.allclose(np.linalg.norm(emb1.numpy(), axis=1), 1.0, atol=1e-4)

    two = setup["root"] / "emb2"
    run_command(["-m", "notellm2.launcher", "embed", "--config", setup["config"], "--out", str(two), "--batch-size", "4"],
                nproc=2, timeout=300)
    ids2, emb2 = load_embeddings(str(two))
    assert sorted(ids2) == sorted(ids1)
    by_id = dict(zip(ids1, emb1.numpy()))
    for nid, vec in zip(ids2, emb2.numpy()):
        np.testing.assert_allclose(vec, by_id[nid], atol=1e-5)
