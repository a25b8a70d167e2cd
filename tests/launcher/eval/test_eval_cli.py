"""`notellm2 eval` end to end: the demo's flags, several runs in one table, its JSON, markdown,
PNG and TensorBoard outputs, and one-line errors."""
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


def test_several_runs_make_one_table_and_every_output(tmp_path, capsys):
    pd_ = pairs_dir(tmp_path)
    good, bad = embeddings(tmp_path, "good", GOOD), embeddings(tmp_path, "plain_dir", BAD)
    catalog = tmp_path / "catalog.jsonl"
    texts = {"q1": "a", "t1": "a" * 40, "q2": "a" * 40, "t2": "a", "x": "a" * 20, "tr": "b", "u": "c"}
    catalog.write_text("".join(json.dumps({"note_id": n, "title": t, "content": ""}) + "\n" for n, t in texts.items()))
    rc = main(["eval", "--embeddings", f"trained={good}", bad, "--pairs", str(pd_), "--k", "1", "2", "3",
               "--catalog", str(catalog), "--bootstrap", "100", "--out-dir", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert rc == 0
    lines = printed.splitlines()
    assert lines[0].split()[:4] == ["run", "all", "R@1", "all"]
    assert lines[1].startswith("trained ") and lines[2].startswith("plain_dir ")
    assert lines[1].split()[1:4] == ["0.500", "0.500", "1.000"] and lines[2].split()[1:4] == ["0.000", "0.500", "1.000"]
    rep = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert [r["name"] for r in rep["runs"]] == ["trained", "plain_dir"] and "recall" not in rep
    subs = rep["runs"][0]["subsets"]
    assert set(subs) == {"all", "short_query", "long_query", "short_target", "long_target", "cold_start",
                         "head", "tail", "pop_head", "pop_tail"}
    # t1 has 2 training pairs (tr->t1, u->t1), t2 none: t1 is the only warm target, too few for thirds
    assert subs["cold_start"]["n"] == 1 and subs["head"]["n"] == 0
    md = (tmp_path / "out" / "eval.md").read_text()
    assert md.startswith("| run | all R@1 |") and "| trained | 0.500 [" in md
    import matplotlib.image

    png = matplotlib.image.imread(str(tmp_path / "out" / "recall.png"))
    assert png.ndim == 3 and png.shape[0] > 200 and png.std() > 0.01  # a drawn figure, not a blank canvas
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "out" / "tensorboard" / "plain_dir"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("recall/all")] == [(1, 0.0), (2, 0.5), (3, 1.0)]


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
])
def test_bad_input_is_one_line_naming_the_file(tmp_path, capsys, args, message):
    d = pairs_dir(tmp_path)
    emb = embeddings(tmp_path, "emb", GOOD)
    runs = [emb]
    if "--no-split-file" in args:
        (d / "note_split.parquet").unlink()
    if "--embeddings-missing" in args:
        runs = [str(tmp_path / "nowhere")]
    if "--twice" in args:
        runs = [emb, emb]
    rc = main(["eval", "--embeddings", *runs, "--pairs", str(d)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1


def test_the_cli_choices_are_the_librarys():
    from notellm2.launcher.eval import evaluate, search
    from notellm2.launcher.cli import eval as eval_cmd

    assert eval_cmd.PROTOCOLS == evaluate.PROTOCOLS and eval_cmd.DEFAULT_KS == evaluate.DEFAULT_KS
    assert eval_cmd.BACKENDS == search.BACKENDS
