"""scripts/ladder.py: which rungs run, that a finished rung (same budget and data) is not run again,
and the table it builds from the kept reports. The rung itself is scripts/experiment.py, which the
demo test and the docs-commands test exercise for real; here it is replaced by a recorder."""
from __future__ import annotations

import json
import os
import sys

from tests.helpers.paths import REPO

sys.path.insert(0, os.path.join(REPO, "scripts"))
import ladder  # noqa: E402


def _fake_data(root):
    for rel in ("pairs/pairs.parquet", "pairs/note_split.parquet", "shards/manifest.json"):
        os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
        open(os.path.join(root, rel), "w").write(json.dumps({"name": rel}) if rel.endswith(".json") else rel)


def _report(name, r100, probes):
    runs = []
    for p in probes:
        rn = name if p == "both" else f"{name}:{p}"
        rec = {"10": r100 / 4, "50": r100 / 2, "100": r100}
        runs.append({"name": rn, "num_queries": 10, "pool_size": 100, "subsets": {
            "all": {"n": 10, "recall": rec, "ci": {k: [v - 0.01, v + 0.01] for k, v in rec.items()}},
            "short_query": {"n": 5, "recall": rec, "ci": {k: [v - 0.02, v + 0.02] for k, v in rec.items()}}}})
    return {"protocol": "paper", "protocol_stats": {"test_notes": 100}, "backend": "exact", "bootstrap": {},
            "subset_rules": {}, "runs": runs}


def test_rungs_run_once_and_the_table_spans_seeds(tmp_path, monkeypatch):
    data, results = str(tmp_path / "data"), str(tmp_path / "results")
    _fake_data(data)
    calls = []

    def fake(name, root, data_, config, split, nproc, ks, untrained, repo, overrides, probes, protocol, catalog):
        calls.append(name)
        assert split == "test" and protocol == "paper" and tuple(ks) == ladder.KS
        seed = int(name.rsplit("_s", 1)[1])
        return {"variant": "notellm2", "times": {"train_s": 100.0 + seed},
                **_report(name, 0.5 + 0.1 * seed, ("both", "image"))}

    monkeypatch.setattr(ladder, "run_experiment", fake)
    argv = ["--root", str(tmp_path / "work"), "--data", data, "--results", results, "--seeds", "0", "1",
            "--only", "notellm2"]
    assert ladder.main(argv) == 0
    assert calls == ["notellm2_s0", "notellm2_s1"]
    assert ladder.main(argv) == 0 and calls == ["notellm2_s0", "notellm2_s1"]  # kept reports: nothing re-runs
    # other data (or another budget) makes a kept report stale: the rung runs again
    open(os.path.join(data, "pairs", "pairs.parquet"), "w").write("other pairs")
    assert ladder.main(argv[:-2] + ["--only", "notellm2_s1"]) == 0 and calls[-1] == "notellm2_s1" and len(calls) == 3
    table = open(os.path.join(results, "ladder.md")).read()
    assert "| notellm2_s0 | 0.125 [0.115, 0.135] | 0.250 [0.240, 0.260] | 0.500 [0.490, 0.510] |" in table
    # mean ± half the range over the two seeds, per probe, with the training wall time
    assert "| notellm2 | both | 2 | 0.138 ± 0.012 | 0.275 ± 0.025 | 0.550 ± 0.050 | 0.550 ± 0.050 | 100 ± 0 |" in table
    assert "| notellm2 | image | 2 |" in table
    assert "Chance (random encoder, pool 100): R@10 0.100, R@50 0.500, R@100 1.000" in table
    kept = json.load(open(os.path.join(results, "notellm2_s0.json")))
    assert kept["budget_key"] and all("embeddings" not in r for r in kept["eval"]["runs"])


def test_rung_names_and_filters():
    names = [r["name"] for r in ladder.rungs([0, 1])]
    assert names[:3] == ["untrained_notellm2", "minilm_zero_shot", "notellm2_s0"]
    assert {f"{v}_s{s}" for v in ladder.VARIANTS for s in (0, 1)} | {"two_tower_s0", "two_tower_s1"} <= set(names)
    assert names.index("two_tower_s0") < names.index("notellm2_s1")  # seed-major
    # the negative-option ablations come after the whole ladder, one per option and seed
    assert names[-4:] == ["notellm2_logq_s0", "notellm2_mask_s0", "notellm2_logq_s1", "notellm2_mask_s1"]
    assert ladder.rungs([0], only=["notellm2_logq"])[0]["overrides"] == [
        "model.variant=notellm2", "train.seed=0", "data.seed=0", "loss.logq_correction=true"]
    assert [r["name"] for r in ladder.rungs([0], only=["notellm2"])] == ["notellm2_s0"]  # not the ablations
    assert [r["name"] for r in ladder.rungs([0], only=["micl"])] == ["micl_s0"]
    assert [r["name"] for r in ladder.rungs([0, 1], only=["two_tower_s1", "minilm_zero_shot"])] == \
        ["minilm_zero_shot", "two_tower_s1"]


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
