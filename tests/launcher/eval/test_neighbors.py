"""`notellm2 neighbors`: the related-notes table on hand-built vectors."""
import math
import os

import numpy as np
import pandas as pd
import pytest

from notellm2.launcher.cli import main
from notellm2.launcher.eval.evaluate import save_embeddings


def circle(tmp_path, angles):
    ids = [f"n{a}" for a in angles]
    vec = np.array([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in angles], np.float32)
    save_embeddings(str(tmp_path / "emb"), ids, vec * 3.0)  # not unit length: neighbours are by cosine
    return str(tmp_path / "emb")


def test_neighbors_table_on_a_circle(tmp_path, capsys):
    emb = circle(tmp_path, [0, 10, 25, 45, 90, 180])
    out = tmp_path / "related.parquet"
    rc = main(["neighbors", "--embeddings", emb, "--k", "3", "--out", str(out), "--chunk", "4"])
    assert rc == 0 and "18 rows" in capsys.readouterr().out
    df = pd.read_parquet(out)
    assert list(df.columns) == ["note_id", "neighbor_id", "rank", "score"]
    got = {n: g.sort_values("rank")["neighbor_id"].tolist() for n, g in df.groupby("note_id")}
    assert got == {"n0": ["n10", "n25", "n45"], "n10": ["n0", "n25", "n45"], "n25": ["n10", "n45", "n0"],
                   "n45": ["n25", "n10", "n0"], "n90": ["n45", "n25", "n10"], "n180": ["n90", "n45", "n25"]}
    assert (df["note_id"] != df["neighbor_id"]).all()
    assert sorted(df["rank"].unique()) == [1, 2, 3]
    row = df[(df.note_id == "n0") & (df["rank"] == 2)].iloc[0]
    assert row.score == pytest.approx(math.cos(math.radians(25)), abs=1e-6)
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_neighbors_with_faiss_prints_its_recall(tmp_path, capsys):
    rng = np.random.default_rng(0)
    ids = [f"n{i}" for i in range(300)]
    save_embeddings(str(tmp_path / "emb"), ids, rng.normal(size=(300, 8)).astype(np.float32))
    out = tmp_path / "related.parquet"
    rc = main(["neighbors", "--embeddings", str(tmp_path / "emb"), "--k", "5", "--out", str(out),
               "--backend", "faiss-hnsw"])
    err = capsys.readouterr().err
    assert rc == 0 and "faiss-hnsw recall@5 against exact search on 300 notes:" in err
    df = pd.read_parquet(out)
    assert len(df) == 1500 and (df["note_id"] != df["neighbor_id"]).all()


def test_a_bad_k_is_one_line_and_leaves_the_old_table(tmp_path, capsys):
    emb = circle(tmp_path, [0, 10, 25])
    out = tmp_path / "related.parquet"
    out.write_bytes(b"old")
    rc = main(["neighbors", "--embeddings", emb, "--k", "3", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--k 3: must be between 1 and the number of notes minus one (2)" in err
    assert out.read_bytes() == b"old"


def test_progress_counts_every_chunk(tmp_path, capsys):
    """The search reports every chunk of notes once; the bar ends at the chunk count."""
    vectors = np.random.default_rng(0).standard_normal((150, 4)).astype(np.float32)
    save_embeddings(str(tmp_path / "emb"), [f"n{i}" for i in range(150)], vectors)
    assert main(["neighbors", "--embeddings", str(tmp_path / "emb"), "--k", "3", "--chunk", "40",
                 "--out", str(tmp_path / "r2.parquet")]) == 0
    err = capsys.readouterr().err
    assert "neighbors: 100%" in err and "4/4" in err
    assert len(pd.read_parquet(tmp_path / "r2.parquet")) == 450 and not (tmp_path / "r2.parquet.parts").exists()
