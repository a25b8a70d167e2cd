"""A run with data.vision_cache trains, validates and embeds exactly as the run without it: the same
fixed-seed 2-rank ZeRO-3 training (gloo, fp32, random flips on), its validation loss and its
in-training retrieval evaluation (which embeds through launcher/eval/embed.py), `notellm2 embed --config`
and `notellm2 embed --model EXPORT --vision-cache`, each run once on pixels and once on a cache written
by `notellm2 data cache-vision`."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers.paths import REPO
from tests.helpers.runs import metrics_by_step

COMPARED = ("loss/", "optim/grad_norm", "model/", "eval/", "lr/")


def _cli(*args, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "notellm2.launcher", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_training_validation_and_embedding_are_identical_with_and_without_the_cache(tmp_path):
    from tests.helpers.multirank import run_command
    from tests.helpers.real_setup import build_inputs, write_config

    inputs = build_inputs(str(tmp_path / "in"))
    shard_dir = os.path.dirname(inputs["train_shards"])
    notes = os.path.join(shard_dir, "notes-val-*.tar")
    pairs = str(tmp_path / "in" / "data" / "pairs")
    ov = ["data.random_flip=true", f"eval.notes_shards={notes}", f"eval.pairs={pairs}", "eval.max_notes=24",
          "eval.k_values=[5]", "eval.batch_size=8", "train.max_steps=2", "eval.every_steps=2",
          "checkpoint.every_steps=100"]
    cfg = write_config(str(tmp_path / "run.yaml"), inputs, str(tmp_path / "unused"), precision="fp32")

    cache = str(tmp_path / "vision-cache")
    out = _cli("data", "cache-vision", "--config", cfg, *ov, "--flip", "--out", cache, "--no-progress")
    assert "tower key:" in out.stdout and os.path.isfile(os.path.join(cache, "cache.json"))
    meta = json.load(open(os.path.join(cache, "cache.json")))
    # the config's shard sets by default: train, val and eval.notes_shards
    assert any(n.startswith("pairs-val-") for n in meta["shards"]) and any(n.startswith("notes-val-") for n in meta["shards"])
    assert meta["orientations"] == ["plain", "flipped"]

    runs = {}
    for name, extra in (("pixels", []), ("cached", [f"data.vision_cache={cache}"])):
        run = str(tmp_path / name)
        res = run_command(["-m", "notellm2.launcher", "train", "--config", cfg, *ov, *extra, f"train.output_dir={run}"],
                          nproc=2, timeout=400)
        assert ("the vision tower does not run" in res.output) == (name == "cached"), res.output[-3000:]
        runs[name] = metrics_by_step(run)
    assert sorted(runs["pixels"]) == sorted(runs["cached"]) == [1, 2]
    for step in (1, 2):
        a, b = runs["pixels"][step], runs["cached"][step]
        keys = sorted(k for k in a if k.startswith(COMPARED))
        assert keys == sorted(k for k in b if k.startswith(COMPARED))
        assert "optim/grad_norm" in keys and "loss/total" in keys
        if step == 2:
            assert {"eval/val_loss", "eval/recall@5", "eval/image_recall@5"} <= set(keys), keys
        diff = {k: (a[k], b[k]) for k in keys if a[k] != b[k]}
        assert not diff, f"step {step}: {diff}"

    # notellm2 embed --config (the untrained baseline) on the notes shards, both ways
    vecs = {}
    for name, extra in (("pixels", []), ("cached", [f"data.vision_cache={cache}"])):
        emb = str(tmp_path / f"emb-{name}")
        _cli("embed", "--config", cfg, *ov, *extra, "--shards", notes, "--out", emb, "--num-workers", "0")
        ids = open(os.path.join(emb, "ids.txt")).read().split()
        vecs[name] = (ids, np.load(os.path.join(emb, "embeddings.npy")))
    assert vecs["pixels"][0] == vecs["cached"][0]
    assert np.array_equal(vecs["pixels"][1], vecs["cached"][1])

    # notellm2 embed --model EXPORT (the trained model: no config) with --vision-cache, both ways
    export = str(tmp_path / "export")
    _cli("export", "--run-dir", str(tmp_path / "pixels"), "--out", export)
    got = {}
    for name, extra in (("pixels", []), ("cached", ["--vision-cache", cache])):
        emb = str(tmp_path / f"emb-model-{name}")
        _cli("embed", "--model", export, *extra, "--shards", notes, "--out", emb, "--num-workers", "0")
        got[name] = (open(os.path.join(emb, "ids.txt")).read().split(), np.load(os.path.join(emb, "embeddings.npy")))
    assert got["pixels"][0] == got["cached"][0] and len(got["pixels"][0]) > 0
    assert np.array_equal(got["pixels"][1], got["cached"][1])
    assert not np.array_equal(got["pixels"][1], vecs["pixels"][1])  # the trained model, not the untrained one


def test_cli_refuses_a_mismatched_cache_in_one_line(tmp_path):
    """`notellm2 data cache-vision` writes a cache; `notellm2 embed --config` with another tower refuses it."""
    from tests.helpers.configs import write_tiny_config
    from tests.helpers.models import make_tiny_clip_dir, make_tiny_llm_dir
    from tests.helpers.shards import write_note_shards

    notes = str(tmp_path / "notes")
    write_note_shards(notes, [6])
    llm = make_tiny_llm_dir(str(tmp_path))
    clips = [make_tiny_clip_dir(str(tmp_path), seed=s) for s in (0, 1)]
    cfgs = [write_tiny_config(tmp_path / f"c{s}.yaml", {"model.llm.path": llm, "model.vision.path": c,
                                                        "data.notes_shards": f"{notes}/*.tar", "data.num_workers": 0})
            for s, c in enumerate(clips)]
    cache = str(tmp_path / "cache")
    _cli("data", "cache-vision", "--config", cfgs[0], "--out", cache, "--no-progress")
    again = _cli("data", "cache-vision", "--config", cfgs[0], "--out", cache, "--no-progress", check=False)
    assert again.returncode == 2 and "exists; pass --overwrite" in again.stderr
    bad = _cli("embed", "--config", cfgs[1], f"data.vision_cache={cache}", "--out", str(tmp_path / "e"),
               "--num-workers", "0", check=False)
    assert bad.returncode == 2, bad.stderr[-2000:]
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("notellm2 embed: data.vision_cache:") and "key" in last, last
    assert "Traceback" not in bad.stderr
