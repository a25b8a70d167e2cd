"""scripts/ladder.py: the learning-rate grid on val decides the test runs, a finished rung (same budget,
data and split) is not run again, the seed-0 test run reuses the grid's training, the plan names every
command, and the table is built from the kept reports. The rung itself is scripts/experiment.py
(`run_experiment`, whose commands `plan_experiment` gives); here it is replaced by a recorder."""
from __future__ import annotations

import json
import os
import sys

from tests.helpers.paths import REPO

sys.path.insert(0, os.path.join(REPO, "scripts"))
import experiment  # noqa: E402
import ladder  # noqa: E402

# val score (MRR) of each grid run: text_only likes 2e-4, basic_mm 5e-5, notellm2 1e-4, the two-tower 2e-4
VAL = {("text_only", 2e-4): 0.30, ("basic_mm", 5e-5): 0.35, ("notellm2", 1e-4): 0.40, ("two_tower", 2e-4): 0.25,
       ("micl", 5e-5): 0.33, ("micl", 1e-4): 0.31, ("late_fusion", 5e-5): 0.20, ("late_fusion", 1e-4): 0.36,
       ("notellm2_newlr5x", 1e-4): 0.90}  # a cause test that beats the grid must not become notellm2's chosen rate
OVERRIDES = {}


def _fake_data(root):
    for rel in ("pairs/pairs.parquet", "pairs/note_split.parquet", "shards/manifest.json"):
        os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
        open(os.path.join(root, rel), "w").write(json.dumps({"name": rel}) if rel.endswith(".json") else rel)


def _report(name, split, mrr, probes):
    runs = []
    for p in probes:
        rec = {"1": mrr / 2, "5": mrr, "10": mrr * 1.5}
        sub = {"n": 10, "recall": rec, "ci": {k: [v - 0.01, v + 0.01] for k, v in rec.items()},
               "mrr": mrr, "mrr_ci": [mrr - 0.02, mrr + 0.02]}
        runs.append({"name": name if p == "both" else f"{name}:{p}", "num_queries": 10, "pool_size": 100,
                     "subsets": {"all": sub, "text_poor": {"n": 0, "na": "no query without text"}},
                     "queries": {"query_id": ["q"] * 10, "greater": [0] * 10, "equal": [0] * 10}})
    return {"protocol": "paper", "protocol_stats": {"test_notes": 100}, "runs": runs}


def _recorder(calls):
    def fake(name, root, data, config, split, nproc, ks, untrained, repo, overrides, probes, protocol, catalog,
             vision_cache):
        calls.append((name, split, vision_cache))
        OVERRIDES[name] = list(overrides)
        assert protocol == "paper" and tuple(ks) == (1, 5, 10) and catalog.endswith("catalog.jsonl")
        variant = name.split("_lr")[0]
        lr = float(name.split("_lr")[1].split("_s")[0]) if "_lr" in name else None
        seed = int(name.rsplit("_s", 1)[1]) if lr is not None else 0
        mrr = VAL.get((variant, lr), 0.1) if split == "val" else 0.5 + 0.01 * seed
        return {"variant": variant, "times": {"train_s": 100.0}, **_report(name, split, mrr, probes)}
    return fake


def test_the_grid_decides_the_followers_and_the_test_runs_and_nothing_runs_twice(tmp_path, monkeypatch):
    data, results = str(tmp_path / "data"), str(tmp_path / "results")
    _fake_data(data)
    calls = []
    monkeypatch.setattr(ladder, "run_experiment", _recorder(calls))
    monkeypatch.setattr(ladder, "ensure_models", lambda: calls.append(("models", None, None)))
    argv = ["--root", str(tmp_path / "work"), "--data", data, "--results", results]
    assert ladder.main(argv) == 0
    assert calls.pop(0)[0] == "models"  # the configs' models are prepared before the first run
    val = [c[0] for c in calls if c[1] == "val"]
    assert val[:12] == [f"{v}_lr{t}_s0" for v in ladder.TUNED for t in ("5e-05", "1e-04", "2e-04")]
    # followers: basic_mm's best (5e-5) and notellm2's (1e-4); micl keeps 5e-5, late_fusion 1e-4
    assert val[12:16] == ["micl_lr5e-05_s0", "micl_lr1e-04_s0", "late_fusion_lr5e-05_s0", "late_fusion_lr1e-04_s0"]
    test = [c[0] for c in calls if c[1] == "test"]
    chosen = {"notellm2": "1e-04", "text_only": "2e-04", "basic_mm": "5e-05", "micl": "5e-05", "late_fusion": "1e-04",
              "two_tower": "2e-04", "notellm2_lite2": "1e-04"}
    assert test == [f"{v}_lr{chosen[v]}_s{s}" for s in (0, 1, 2) for v in ladder.TESTED] + ["minilm_zero_shot"]
    # the tower's features come from the data's caches: Lite0, Lite2 for the larger-tower rung, none for text
    caches = {name: cache for name, split, cache in calls if split == "test"}
    assert caches["notellm2_lr1e-04_s1"].endswith("vision_cache/lite0")
    assert caches["notellm2_lite2_lr1e-04_s1"].endswith("vision_cache/lite2")
    assert caches["text_only_lr2e-04_s1"] is None and caches["two_tower_lr2e-04_s1"] is None
    # item 6's cause tests: notellm2 at its chosen rate on val, one change each, after the test runs
    causes = [c[0] for c in calls[12 + 4 + 21 + 1:]]
    assert causes == [f"notellm2_{t}_lr1e-04_s0" for t in ladder.CAUSES]
    assert OVERRIDES["notellm2_visw0_lr1e-04_s0"][-1] == "loss.micl_weight_vis=0.0"
    five = OVERRIDES["notellm2_newlr5x_lr1e-04_s0"]
    assert "train.lr_new=5.0e-04" in five and "train.lr_new=2.0e-04" not in five and "train.lr_llm=1.0e-04" in five
    n = len(calls)
    assert n == 12 + 4 + 21 + 1 + len(ladder.CAUSES)
    assert ladder.main(argv) == 0 and calls.pop()[0] == "models" and len(calls) == n  # every report kept: nothing runs again
    # other data makes every kept report stale
    open(os.path.join(data, "pairs", "pairs.parquet"), "w").write("other pairs")
    assert ladder.main(argv + ["--only", "text_only"]) == 0
    assert [c[0] for c in calls[n + 1:]] == [f"text_only_lr{t}_s0" for t in ("5e-05", "1e-04", "2e-04")] + \
        [f"text_only_lr2e-04_s{s}" for s in (0, 1, 2)]
    table = open(os.path.join(results, "ladder.md")).read()
    assert "| notellm2 | 1e-04 | 0.200 [0.190, 0.210] | 0.400 [0.390, 0.410] | 0.600 [0.590, 0.610] | " \
           "0.400 [0.380, 0.420] | yes |" in table
    assert "| notellm2 | both | 3 | 1e-04 | 0.255 ± 0.005 | 0.510 ± 0.010 | 0.765 ± 0.015 | 0.510 ± 0.010 |" in table
    assert "| notellm2_lite2_lr1e-04_s0:image |" in table and "| minilm_zero_shot | 0.250" in table
    assert "n/a" in table  # the text_poor subset the report calls degenerate
    assert "| notellm2_newlr5x | 1e-04 |" not in table  # the cause tests have their own section
    assert "| notellm2_newlr5x_lr1e-04_s0 | train.lr_new=5.0e-04 | " in table.split("## Item 6")[1]
    kept = json.load(open(os.path.join(results, "notellm2_lr1e-04_s0.test.json")))
    assert kept["lr"] == 1e-4 and kept["tower"] == "lite0" and "queries" in kept["eval"]["runs"][0]


def test_the_seed_0_test_run_reuses_the_grid_training_and_the_plan_names_each_command(tmp_path):
    """The grid's run and the test run of the same variant, rate and seed share a folder, so the test run
    only embeds and evaluates; the plan shows the training as done and every command in full."""
    data, results, root = str(tmp_path / "data"), str(tmp_path / "results"), str(tmp_path / "work")
    _fake_data(data)
    grid, test = ladder.rung("notellm2", 1e-4, 0, "val", ("both",)), ladder.rung("notellm2", 1e-4, 0, "test")
    assert grid["name"] == test["name"] and grid["overrides"] == test["overrides"]
    args = ladder._experiment_args(test, root, data)
    before = experiment.plan_experiment(**args)
    assert [s["stage"] for s in before["steps"]] == ["train", "export", "embed_both", "embed_text", "embed_image", "eval"]
    cache = os.path.join(data, "vision_cache", "lite0")
    train, embed = before["steps"][0]["cmd"], before["steps"][2]["cmd"]
    assert f"data.vision_cache={cache}" in train and "train.lr_llm=1.0e-04" in train and "train.lr_new=2.0e-04" in train
    assert embed[embed.index("--vision-cache") + 1] == cache and f"{data}/shards/notes-test-*.tar" in embed
    os.makedirs(os.path.join(root, test["name"], "export"))
    open(os.path.join(root, test["name"], "train.done"), "w").write("")
    open(os.path.join(root, test["name"], "export", "config.yaml"), "w").write("")
    after = experiment.plan_experiment(**args)
    assert [s["done"] for s in after["steps"]] == [True, True, False, False, False, False]
    lines = []
    counts = ladder.print_plan([0, 1, 2], root, data, results, ladder.data_fingerprint(data), out=lines.append)
    text = "\n".join(lines)
    # the grid and MiniLM; the rest pending; notellm2 at 1e-4 is trained already (above)
    assert counts == {"kept": 0, "to_run": 13, "trainings_to_run": 11}
    assert "   train: " in text and " -m notellm2.launcher eval --embeddings notellm2_lr1e-04_s0=" in text
    assert "-- micl: pending (waits for the grid of basic_mm and notellm2)" in text
    assert "-- notellm2_lite2: test runs pending (learning rate not chosen yet)" in text


def test_data_fingerprint_ignores_the_folder_but_not_the_data(tmp_path):
    """The same data built in two folders has one fingerprint (the manifest's recorded paths and the
    mining manifest's hash, which holds an absolute path, are left out); changed pairs change it."""
    def build(root, mining_sha, pairs=b"PAIRS", **extra):
        os.makedirs(root / "pairs")
        os.makedirs(root / "shards")
        (root / "pairs" / "pairs.parquet").write_bytes(pairs)
        (root / "pairs" / "note_split.parquet").write_bytes(b"SPLIT")
        manifest = {"counts": {"test": {"pairs_written": 3}}, "sources": {
            "catalog": {"path": f"{root}/catalog.jsonl", "sha256": "c0ffee"},
            "mining_manifest": {"path": f"{root}/pairs/mining_manifest.json", "sha256": mining_sha}}, **extra}
        (root / "shards" / "manifest.json").write_text(json.dumps(manifest, indent=2))
        return str(root)

    a = ladder.data_fingerprint(build(tmp_path / "a", "hash-of-/a/views"))
    b = ladder.data_fingerprint(build(tmp_path / "b", "hash-of-/b/views"))
    c = ladder.data_fingerprint(build(tmp_path / "c", "hash-of-/c/views", pairs=b"OTHER"))
    assert a == b and a != c
    # newer write-shards name their problem log in the manifest: the same data keeps its fingerprint
    assert ladder.data_fingerprint(build(tmp_path / "d", "x", problem_log="problems.jsonl")) == a
