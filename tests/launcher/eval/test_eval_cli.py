"""`notellm2 eval` end to end: the demo's flags, several runs and reference rows in one report, the
paired test against a baseline, the JSON, markdown, PNG and TensorBoard outputs, and one-line errors."""
import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from notellm2.launcher.cli import main
from notellm2.launcher.eval.evaluate import save_embeddings
from tests.helpers.multirank import REPO


def unit(deg):
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def pairs_dir(tmp_path):
    d = tmp_path / "pairs"
    d.mkdir()
    pairs = [("q1", "t1", "test"), ("q1", "t2", "test"), ("q2", "t2", "test"), ("q2", "tr", "test"),
             ("tr", "t1", "train"), ("tr", "u", "train"), ("u", "t1", "train")]
    pd.DataFrame({"query_id": [p[0] for p in pairs], "target_id": [p[1] for p in pairs],
                  "score": [1.0] * len(pairs), "split": [p[2] for p in pairs]}).to_parquet(d / "pairs.parquet")
    notes = {"q1": "test", "t1": "test", "q2": "test", "t2": "test", "x": "test", "tr": "train", "u": "train"}
    pd.DataFrame({"note_id": list(notes), "split": list(notes.values())}).to_parquet(d / "note_split.parquet")
    return d


def embeddings(tmp_path, name, angles):
    save_embeddings(str(tmp_path / name), list(angles), np.array([unit(a) for a in angles.values()], np.float32))
    return str(tmp_path / name)


GOOD = {"q1": 0, "x": 10, "q2": 5, "t2": 6, "t1": 30, "tr": 1, "u": 2}   # ranks: q1->t1 2, q2->t2 0
BAD = {"q1": 0, "x": 1, "q2": 180, "t2": 1.5, "t1": 2, "tr": 1, "u": 2}  # q1->t1 2, q2->t2 1


def test_the_demo_flags_still_work_under_the_paper_protocol(tmp_path):
    emb = embeddings(tmp_path, "emb", GOOD)
    out = subprocess.run([sys.executable, "-m", "notellm2.launcher", "eval", "--embeddings", emb, "--pairs",
                          str(pairs_dir(tmp_path)), "--split", "test", "--k", "1", "3", "10", "--out",
                          str(tmp_path / "r.json")], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["protocol"] == "paper" and report["recall"] == {"1": 0.5, "3": 1.0}
    assert report["num_pairs"] == 2 and report["pool_size"] == 3 and report["runs"][0]["capped"] == [10]
    assert "K capped at the pool size: 10" in out.stdout


def write_catalog(tmp_path):
    catalog = tmp_path / "catalog.jsonl"
    texts = {"q1": "a", "t1": "a" * 40, "q2": "a" * 40, "t2": "a", "x": "a" * 20, "tr": "b", "u": "c"}
    topics = {"q1": ["a" * 30]}  # topics count: q1 has 31 characters of text
    cats = {"q1": "c1", "t1": "c1", "x": "c1", "q2": "c2", "t2": "c1"}
    catalog.write_text("".join(json.dumps({"note_id": n, "title": t, "content": "", "topics": topics.get(n, []),
                                           "category": cats.get(n)}) + "\n" for n, t in texts.items()))
    return catalog


def test_several_runs_make_one_report_and_every_output(tmp_path, capsys):
    pd_ = pairs_dir(tmp_path)
    good, bad = embeddings(tmp_path, "good", GOOD), embeddings(tmp_path, "plain_dir", BAD)
    catalog = write_catalog(tmp_path)
    rc = main(["eval", "--embeddings", f"trained={good}", bad, "--reference", "category", "--pairs", str(pd_),
               "--k", "1", "2", "3", "--catalog", str(catalog), "--bootstrap", "100", "--out-dir",
               str(tmp_path / "out"), "--baseline", "plain_dir"])
    printed = capsys.readouterr().out
    assert rc == 0
    lines = printed.splitlines()
    assert lines[0] == "subset all (ties fair)"
    assert lines[1].split() == ["run", "n", "R@1", "R@2", "R@3", "NDCG@1", "NDCG@2", "NDCG@3", "MRR"]
    assert lines[2].split()[:5] == ["trained", "2", "0.500", "0.500", "1.000"]
    assert lines[3].split()[:5] == ["plain_dir", "2", "0.000", "0.500", "1.000"]
    # the oracle: q1 (c1) -> t1 ties with x and t2 (c1): 1/3; q2 (c2) -> t2 (c1): nothing above it, all 3 tied
    assert lines[4].split()[:3] == ["category", "2", f"{(1 / 3 + 1 / 3) / 2:.3f}"]
    text = (tmp_path / "out" / "eval.json").read_text()
    rep = json.loads(text)
    assert '      "greater": [2, 0],\n' in text  # per-query lists on one line each
    assert [r["name"] for r in rep["runs"]] == ["trained", "plain_dir", "category"] and "recall" not in rep
    assert rep["ties"] == "fair" and rep["runs"][2]["kind"] == "reference"
    subs = rep["runs"][0]["subsets"]
    assert set(subs) == {"all", "short_query", "long_query", "short_target", "long_target", "text_poor", "text_rich",
                         "cold_start", "head", "tail", "pop_head", "pop_tail"}
    # t1 has 2 training pairs (tr->t1, u->t1), t2 none: t1 is the only warm target, too few for thirds
    assert subs["cold_start"]["n"] == 1 and subs["head"] == {"n": 0, "na": "empty: no evaluated pair is in it"}
    # q1 has 31 characters with its topics: q1 -> t1 is text-rich, q2 -> t2 ("a") text-poor
    assert subs["text_poor"]["n"] == 1 and subs["text_poor"]["recall"]["1"] == 1.0  # q2 -> t2: rank 0
    assert subs["text_rich"]["n"] == 1 and subs["text_rich"]["recall"]["1"] == 0.0  # q1 -> t1: rank 2
    assert "n/a in every run: head (empty: no evaluated pair is in it)" in printed
    # test notes with the text and image of a training note: q2 ("a" x 40, no image) = t1, which is in training pairs
    assert rep["protocol_stats"]["test_notes_with_exact_train_duplicate"] == 1
    # the paired test, printed and in the JSON and markdown
    paired = rep["paired"]
    assert paired["baseline"] == "plain_dir" and [r["name"] for r in paired["runs"]] == ["trained", "category"]
    assert paired["runs"][0]["subsets"]["all"]["recall"]["1"]["diff"] == 0.5
    assert "paired: run minus plain_dir" in printed
    md = (tmp_path / "out" / "eval.md").read_text()
    assert md.startswith("### all\n\n| run | n | R@1 |") and "| trained | 2 | 0.500 [" in md and "### paired" in md
    import matplotlib.image

    png = matplotlib.image.imread(str(tmp_path / "out" / "recall.png"))
    assert png.ndim == 3 and png.shape[0] > 200 and png.std() > 0.01  # a drawn figure, not a blank canvas
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "out" / "tensorboard" / "plain_dir"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("recall/all")] == [(1, 0.0), (2, 0.5), (3, 1.0)]
    assert [e.value for e in acc.Scalars("mrr/all")] == [pytest.approx((1 / 3 + 1 / 2) / 2)]


def test_ties_pessimistic_keeps_the_old_rule(tmp_path, capsys):
    """Constant vectors: fair ties give chance, pessimistic ties give 0 below K = pool."""
    const = {n: 0 for n in GOOD}
    emb, pairs = embeddings(tmp_path, "const", const), pairs_dir(tmp_path)
    out = {}
    for ties in ("fair", "pessimistic"):
        assert main(["eval", "--embeddings", emb, "--pairs", str(pairs), "--k", "1", "2", "--bootstrap",
                     "10", "--ties", ties, "--out", str(tmp_path / f"{ties}.json")]) == 0
        out[ties] = json.loads((tmp_path / f"{ties}.json").read_text())
    assert out["fair"]["recall"] == pytest.approx({"1": 1 / 3, "2": 2 / 3}) and out["fair"]["ties"] == "fair"
    assert out["pessimistic"]["recall"] == {"1": 0.0, "2": 0.0}


def test_all_pairs_protocol_is_todays_ranking(tmp_path, capsys):
    emb = embeddings(tmp_path, "emb", GOOD)
    rc = main(["eval", "--embeddings", emb, "--pairs", str(pairs_dir(tmp_path)), "--protocol", "all-pairs",
               "--k", "1", "5", "--bootstrap", "10", "--out", str(tmp_path / "r.json")])
    assert rc == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    # every test pair, every embedded note but the query: q1->t1 5 ahead (tr u q2 t2 x), q1->t2 2 (tr u),
    # q2->t2 0, q2->tr 3 (t2 u q1)
    assert rep["num_pairs"] == 4 and rep["pool_size"] == 6 and rep["recall"] == {"1": 0.25, "5": 0.75}


@pytest.mark.parametrize("args,message", [
    (["--protocol", "paper", "--no-split-file"], "note_split.parquet: note split file does not exist"),
    (["--embeddings-missing"], "embeddings.npy: no embeddings"),
    (["--twice"], "run name 'emb' given twice"),
    (["--k", "10", "0"], "--k 0: every K must be at least 1"),
    (["--k", "-5"], "--k -5: every K must be at least 1"),
    (["--bootstrap", "0"], "--bootstrap 0: the intervals need at least 1 resample"),
    (["--nan"], "emb ("),
    (["--baseline", "nope"], "--baseline 'nope': no run of that name (runs: emb)"),
    (["--baseline", "emb"], "--baseline 'emb': a paired test needs a second run"),
    (["--reference", "tfidf"], "--reference 'tfidf': unknown kind 'tfidf'"),
    (["--reference", "bm25", "--protocol", "all-pairs"], "--reference bm25: reference rows need --protocol paper"),
    (["--reference", "category"], "--reference category: needs --catalog"),
    (["--no-runs"], "nothing to evaluate: give --embeddings, --reference or both"),
])
def test_bad_input_is_one_line_naming_the_file(tmp_path, capsys, args, message):
    d = pairs_dir(tmp_path)
    emb = embeddings(tmp_path, "emb", GOOD)
    runs = ["--embeddings", emb]
    if "--no-split-file" in args:
        (d / "note_split.parquet").unlink()
    if "--embeddings-missing" in args:
        runs = ["--embeddings", str(tmp_path / "nowhere")]
    if "--twice" in args:
        runs = ["--embeddings", emb, emb]
    if "--nan" in args:
        vec = np.load(f"{emb}/embeddings.npy")
        vec[2, 1] = np.nan
        np.save(f"{emb}/embeddings.npy", vec)
    if "--no-runs" in args:
        runs = []
    flags = [a for a in args if a not in ("--no-split-file", "--embeddings-missing", "--twice", "--nan", "--no-runs")]
    rc = main(["eval", *runs, "--pairs", str(d), *flags])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1, err
    if "--nan" in args:
        assert "1 embeddings hold NaN or inf (first: q2)" in err


def test_the_cli_choices_are_the_librarys():
    from notellm2.launcher.eval import evaluate, search
    from notellm2.launcher.cli import eval as eval_cmd

    from notellm2.launcher.eval import subsets

    assert eval_cmd.PROTOCOLS == evaluate.PROTOCOLS and eval_cmd.DEFAULT_KS == evaluate.DEFAULT_KS
    assert eval_cmd.BACKENDS == search.BACKENDS and eval_cmd.TIES == evaluate.TIES
    assert eval_cmd.DEFAULT_TEXT_POOR_CHARS == subsets.DEFAULT_TEXT_POOR_CHARS


def test_paired_diff_script_is_eval_baseline(tmp_path, capsys):
    """scripts/paired_diff.py wraps the same paired bootstrap: from the embeddings, and from a saved
    report alone, it gives eval --baseline's figures."""
    import os

    sys.path.insert(0, os.path.join(REPO, "scripts"))
    from paired_diff import main as paired_main, paired_difference

    d = pairs_dir(tmp_path)
    good, bad = embeddings(tmp_path, "good", GOOD), embeddings(tmp_path, "bad", BAD)
    assert main(["eval", "--embeddings", good, bad, "--pairs", str(d), "--k", "1", "2", "--baseline", "bad",
                 "--out", str(tmp_path / "r.json")]) == 0
    want = json.loads((tmp_path / "r.json").read_text())["paired"]["runs"][0]["subsets"]["all"]
    res = paired_difference(str(d), good, bad, ks=(1, 2))
    assert res["queries"] == 2 and res["diff"] == {1: want["recall"]["1"], 2: want["recall"]["2"]}
    assert res["mrr"] == want["mrr"] and res["diff"][1]["diff"] == 0.5
    capsys.readouterr()
    assert paired_main(["--report", str(tmp_path / "r.json"), "--a", "good", "--b", "bad", "--k", "1", "2"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last[len("RESULT "):])["diff"] == {"1": want["recall"]["1"], "2": want["recall"]["2"]}
