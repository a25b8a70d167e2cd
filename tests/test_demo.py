"""The README's main command, `scripts/demo.sh`, end to end on its short slice (DEMO_SMOKE=1).

It is the command users run first, so CI runs it: real catalog, mined pairs, shards, a 2-rank
ZeRO-3 training run with checkpoints, export, 2-rank embedding and Recall@K for the untrained
baseline and the trained model. About 4-6 minutes on 2 cores.
"""
from __future__ import annotations

import json
import math
import os
import subprocess

import numpy as np
import pytest

from tests.helpers.paths import REPO
from tests.helpers.runs import read_metrics


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_demo_smoke_runs_the_whole_pipeline(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, DEMO_SMOKE="1", DEMO_DIR=str(out))
    proc = subprocess.run(["bash", "scripts/demo.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1100)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "[demo] done in" in proc.stdout

    # training: 4 steps on 2 ranks, checkpoints at 2 and 4, finite losses
    steps = read_metrics(str(out / "run"))
    train_steps = [s for s in steps if "loss/total" in s]
    assert [s["step"] for s in train_steps] == [1, 2, 3, 4]
    assert all(math.isfinite(s["loss/total"]) for s in train_steps)
    assert (out / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert (out / "run" / "config.resolved.yaml").exists()
    assert any((out / "run" / "tensorboard").rglob("events.out.tfevents.*"))

    # export and embeddings: every held-out test note embedded exactly once, unit vectors
    manifest = json.load(open(out / "shards" / "manifest.json"))
    n_test_notes = sum(s["count"] for s in manifest["shards"] if s["kind"] == "notes" and s["split"] == "test")
    assert n_test_notes > 0
    for name in ("emb_untrained", "emb_trained"):
        vec = np.load(out / name / "embeddings.npy")
        ids = (out / name / "ids.txt").read_text().split()
        assert vec.shape == (n_test_notes, 64) and len(set(ids)) == n_test_notes
        np.testing.assert_allclose(np.linalg.norm(vec, axis=1), 1.0, atol=1e-4)
    assert json.load(open(out / "emb_trained" / "embeddings.json"))["world_size"] == 2

    # Recall@K: both models scored on the same test pairs and pool, recall rising with K
    results = [json.load(open(out / f"recall_{m}.json")) for m in ("untrained", "trained")]
    for r in results:
        rec = [r["recall"][k] for k in ("10", "50", "100")]
        assert all(0.0 <= x <= 1.0 for x in rec) and rec == sorted(rec)
        assert r["num_pairs"] > 0 and r["pool_size"] == n_test_notes
    assert results[0]["num_pairs"] == results[1]["num_pairs"]
