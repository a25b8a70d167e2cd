"""`notellm2 embed`: every note of a notes shard set exactly once, the same vectors on 1 or 2 ranks."""
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from launcher.evaluate import load_embeddings
from tests.helpers.models import make_tiny_clip_dir, make_tiny_llm_dir
from tests.helpers.data import synthetic_shards
from tests.helpers.multirank import REPO, base_env, run_command


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    llm = make_tiny_llm_dir(str(root), arch="llama", num_layers=2, hidden=32)
    clip = make_tiny_clip_dir(str(root), hidden=32, layers=1)
    shard_dir, manifest = synthetic_shards(str(root / "data"), n_notes=30, n_categories=3, n_pairs=40,
                                           shard_size=7, image_size=32, splits=("test",))
    cfg = {"model": {"variant": "notellm2", "llm": {"path": llm, "attn_implementation": "sdpa"},
                     "vision": {"kind": "hf", "path": clip, "image_size": 32},
                     "connector": {"kind": "qformer", "num_query_tokens": 2, "num_layers": 1, "hidden_size": 32,
                                   "num_heads": 2},
                     "max_text_tokens": 16, "embed_dim": 8},
           "data": {"notes_shards": os.path.join(shard_dir, "notes-test-*.tar"), "num_workers": 0},
           "train": {"seed": 0}}
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    notes = sum(s["count"] for s in manifest["shards"] if s["kind"] == "notes")
    return {"root": root, "config": str(path), "notes": notes}


def test_embed_one_rank_then_two_ranks_agree(setup):
    one = setup["root"] / "emb1"
    out = subprocess.run([sys.executable, "-m", "launcher", "embed", "--config", setup["config"], "--out", str(one),
                          "--batch-size", "4"], capture_output=True, text=True, cwd=REPO, env=base_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    ids1, emb1 = load_embeddings(str(one))
    assert len(ids1) == setup["notes"] == len(set(ids1))
    assert np.allclose(np.linalg.norm(emb1.numpy(), axis=1), 1.0, atol=1e-4)

    two = setup["root"] / "emb2"
    run_command(["-m", "launcher", "embed", "--config", setup["config"], "--out", str(two), "--batch-size", "4"],
                nproc=2, timeout=300)
    ids2, emb2 = load_embeddings(str(two))
    assert sorted(ids2) == sorted(ids1)
    by_id = dict(zip(ids1, emb1.numpy()))
    for nid, vec in zip(ids2, emb2.numpy()):
        np.testing.assert_allclose(vec, by_id[nid], atol=1e-5)
