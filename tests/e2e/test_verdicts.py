"""scripts/verdicts.py: the pre-registered rule (docs/results.md section 0) applied to kept ladder reports
built by hand: a comparison with every seed is scored by the paired bootstrap of MRR and gets
confirmed / refuted / inconclusive by the 2-of-3 rule; one that lacks a seed stays pending and shows no
figure; a reference row is paired with each seed."""
from __future__ import annotations

import json
import os
import sys

from tests.helpers.paths import REPO

sys.path.insert(0, os.path.join(REPO, "scripts"))
import verdicts  # noqa: E402

N = 40  # queries, each its own note; the first 30 are text-poor
POOR = list(range(30))


def _run(name, greater):
    return {"name": name, "ks": [1, 5, 10],
            "queries": {"query_id": [f"q{i}" for i in range(N)], "target_id": [f"t{i}" for i in range(N)],
                        "greater": list(greater), "equal": [0] * N,
                        "subset_rows": {"text_poor": POOR, "text_rich": list(range(30, N))}}}


def _write(results, variant, seed, greater):
    name = f"{variant}_lr1e-04_s{seed}"
    rep = {"variant": variant, "seed": seed, "eval": {"ties": "fair",
           "bootstrap": {"resamples": 300, "seed": 0, "level": 0.95}, "runs": [_run(name, greater),
                                                                           _run(name + ":text", [0] * N)]}}
    with open(os.path.join(results, f"{name}.test.json"), "w") as fh:
        json.dump(rep, fh)


def test_the_rule_scores_complete_comparisons_and_holds_back_incomplete_ones(tmp_path):
    results = tmp_path / "bench"
    results.mkdir()
    top, mid, low = [0] * N, [3] * N, [9] * N  # reciprocal ranks 1, 1/4, 1/10 for every query
    for s in (0, 1, 2):
        _write(results, "notellm2", s, top)          # best everywhere
        _write(results, "basic_mm", s, low)
        _write(results, "micl", s, low if s == 0 else mid)  # above basic_mm in seeds 1 and 2 only
        _write(results, "late_fusion", s, mid if s == 0 else low)  # above basic_mm in seed 0 only
    for s in (0, 1):
        _write(results, "text_only", s, mid)         # seed 2 missing: pending
    refs = tmp_path / "refs.json"
    refs.write_text(json.dumps({"ties": "fair", "bootstrap": {"resamples": 300, "seed": 0, "level": 0.95},
                                "runs": [_run("tower", mid), _run("bm25", low)]}))
    out = tmp_path / "verdicts.md"
    assert verdicts.main(["--results", str(results), "--references", str(refs), "--out", str(out)]) == 0
    text = out.read_text()
    rows = {(r["check"], r["run"], r["comparison"], r["subset"]): r
            for r in verdicts.evaluate_checks(*verdicts.load_tests(str(results)), *verdicts.load_references(str(refs)))}
    # C1: basic_mm (1/10) below the tower reference (1/4) on text-poor queries in every seed
    c1 = rows[("C1", "basic_mm", "tower", "text_poor")]
    assert c1["verdict"] == "confirmed"
    assert [round(c1["seeds"][s][0], 3) for s in (0, 1, 2)] == [-0.15] * 3 and c1["seeds"][0][2] == 30
    assert rows[("C2", "micl", "basic_mm", "text_poor")]["verdict"] == "confirmed"  # 2 of 3 seeds
    assert rows[("C3", "late_fusion", "basic_mm", "text_poor")]["verdict"] == "inconclusive"  # 1 of 3
    assert rows[("C4a", "notellm2", "basic_mm", "all")]["verdict"] == "confirmed"
    # intervals against the claimed direction in 2 of 3 seeds: refuted; one seed for, two straddling 0: inconclusive
    assert verdicts.verdict([[0.1, 0.2], [0.05, 0.3], [-0.1, 0.1]], -1) == "refuted"
    assert verdicts.verdict([[0.1, 0.2], [-0.2, 0.3], [-0.1, 0.1]], +1) == "inconclusive"
    # text_only lacks seed 2: pending, and none of its figures is shown
    pend = rows[("C4a", "notellm2", "text_only", "all")]
    assert pend["verdict"] == "pending" and pend["seeds"] == {}
    line = next(x for x in text.splitlines() if "| notellm2 > | text_only | all |" in x)
    assert "pending: notellm2 seeds [0, 1, 2], text_only seeds [0, 1]" in line and "[" not in line.split("|")[6]
    assert rows[("C6", "notellm2", "text_only", "text_rich")]["verdict"] == "pending"
    assert rows[("C5", "notellm2_lite2", "notellm2", "all")]["verdict"] == "pending"
    # the comparisons written after the verdicts: the same paired figures, labelled as not pre-registered
    after = {(r["check"], r["subset"]): r for r in verdicts.evaluate_checks(
        *verdicts.load_tests(str(results)), *verdicts.load_references(str(refs)), checks=verdicts.AFTER, no_claim=verdicts.AFTER_LABEL)}
    a2 = after[("A2", "text_poor")]  # notellm2 (1) vs the tower (1/4): +0.75 in every seed
    assert [round(a2["seeds"][s][0], 3) for s in (0, 1, 2)] == [0.75] * 3
    assert a2["verdict"] == verdicts.AFTER_LABEL
    assert after[("A5", "text_rich")]["verdict"] == "pending"  # text_only lacks seed 2
    section = text.split("## After the verdicts")[1]
    assert "| A2 | trained vs the tower alone | notellm2 vs | frozen tower features | text_poor | +0.750" in section
    assert "**reported (not pre-registered)**" in section and "confirmed" not in section
