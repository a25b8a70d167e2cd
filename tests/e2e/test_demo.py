"""The README's main command, `scripts/demo.sh`, end to end on its short slice (DEMO_SMOKE=1).

It is the command users run first, so CI runs it: real catalog, mined pairs, shards, a 2-rank
ZeRO-3 training run with checkpoints, export, 2-rank embedding and Recall@K for the untrained
baseline, the trained model, its image probe and the zero-shot MiniLM, and one Recall@K table. About
6-7 minutes on 2 cores.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

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

    # training: 12 steps on 2 ranks, checkpoints at 6 and 12, finite losses
    steps = read_metrics(str(out / "run"))
    train_steps = [s for s in steps if "loss/total" in s]
    assert [s["step"] for s in train_steps] == list(range(1, 13))
    assert all(math.isfinite(s["loss/total"]) for s in train_steps)
    assert (out / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000012"
    assert (out / "run" / "config.resolved.yaml").exists()
    assert any((out / "run" / "tensorboard").rglob("events.out.tfevents.*"))

    # export and embeddings: every held-out test note embedded exactly once, unit vectors
    manifest = json.load(open(out / "shards" / "manifest.json"))
    n_test_notes = sum(s["count"] for s in manifest["shards"] if s["kind"] == "notes" and s["split"] == "test")
    assert n_test_notes > 0
    for name, dim in (("emb_untrained", 64), ("emb_trained", 64), ("emb_minilm", 384)):
        vec = np.load(out / name / "embeddings.npy")
        ids = (out / name / "ids.txt").read_text().split()
        assert vec.shape == (n_test_notes, dim) and len(set(ids)) == n_test_notes, name
        np.testing.assert_allclose(np.linalg.norm(vec, axis=1), 1.0, atol=1e-4)
    assert json.load(open(out / "emb_trained" / "embeddings.json"))["world_size"] == 2
    image = json.load(open(out / "emb_trained_image" / "embeddings.json"))
    assert image["mode"] == "image" and image["count"] + image["left_out_no_image"] == n_test_notes

    # one table: the four runs on the same paper-protocol queries and pool, recall rising with K
    report = json.load(open(out / "eval" / "eval.json"))
    runs = {r["name"]: r for r in report["runs"]}
    assert list(runs) == ["notellm2", "notellm2_image_probe", "untrained", "minilm_zero_shot"]
    full = [runs[n] for n in ("notellm2", "untrained", "minilm_zero_shot")]
    assert len({(r["num_queries"], r["pool_size"]) for r in full}) == 1
    assert full[0]["pool_size"] + full[0]["num_queries"] == n_test_notes  # pool: the test notes minus the queries
    for r in runs.values():
        rec = [r["subsets"]["all"]["recall"][k] for k in ("10", "50", "100")]
        assert all(0.0 <= x <= 1.0 for x in rec) and rec == sorted(rec), r["name"]
    assert (out / "eval" / "recall.png").stat().st_size > 0 and "notellm2_image_probe" in (out / "eval" / "eval.md").read_text()

    # the smoke run learns: a paired bootstrap over queries puts the lower bound of the trained minus
    # untrained Recall@50 difference above 0 (the seeded run is deterministic, so one run decides)
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    from paired_diff import paired_difference

    res = paired_difference(str(out / "pairs"), out / "emb_trained", out / "emb_untrained", ks=(50,))
    low = res["diff"][50]["ci"][0]
    assert low > 0, res
