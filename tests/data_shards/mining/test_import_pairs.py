"""`notellm2 data import-pairs`: each rule, and the output read back by the pairs readers and write-shards."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from notellm2.data_shards.mining.import_pairs import PairImportError, import_pairs
from notellm2.data_shards.mining.pairs_file import read_note_split, read_pairs
from tests.helpers.paths import REPO


@pytest.fixture
def catalog(tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_text("".join(json.dumps({"note_id": f"n{i}", "title": f"note {i}", "content": "", "topics": []}) + "\n"
                            for i in range(10)))
    return str(path)


def _csv(tmp_path, name, rows, header=None):
    path = tmp_path / name
    lines = ([",".join(header)] if header else []) + [",".join(map(str, r)) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_paper_csvs_one_per_split_become_pairs_and_note_split(tmp_path, catalog):
    train = _csv(tmp_path, "train.csv", [("n0", "n1"), ("n1", "n2"), ("n0", "n1")])  # a duplicate row
    test = _csv(tmp_path, "test.csv", [("n5", "n6"), ("n7", "n5")])
    m = import_pairs(str(tmp_path / "out"), catalog, {"train": train, "test": test})
    pairs = read_pairs(str(tmp_path / "out"))
    assert list(pairs.itertuples(index=False, name=None)) == [
        ("n0", "n1", 1.0, "train"), ("n1", "n2", 1.0, "train"), ("n5", "n6", 1.0, "test"), ("n7", "n5", 1.0, "test")]
    split = dict(read_note_split(str(tmp_path / "out")).itertuples(index=False, name=None))
    assert split == {"n0": "train", "n1": "train", "n2": "train", "n5": "test", "n6": "test", "n7": "test"}
    assert m["pairs"] == {"train": 2, "val": 0, "test": 2} and m["duplicates_dropped"] == 1
    assert m["notes"] == {"train": 3, "val": 0, "test": 3}


def test_one_file_with_a_split_column_and_scores(tmp_path, catalog):
    df = pd.DataFrame({"query_id": ["n0", "n3"], "target_id": ["n1", "n4"], "split": ["train", "val"], "score": [0.5, 2.0]})
    path = tmp_path / "all.parquet"
    df.to_parquet(path)
    import_pairs(str(tmp_path / "out"), catalog, pairs=str(path))
    got = read_pairs(str(tmp_path / "out"))
    assert got["score"].tolist() == [0.5, 2.0] and got["split"].tolist() == ["train", "val"]
    csv_path = _csv(tmp_path, "all.csv", [("n0", "n1", "train")], header=("query_id", "target_id", "split"))
    import_pairs(str(tmp_path / "out2"), catalog, pairs=csv_path)
    assert read_pairs(str(tmp_path / "out2"))["score"].tolist() == [1.0]  # no score column: 1.0


def test_ids_missing_from_the_catalog_are_named(tmp_path, catalog):
    train = _csv(tmp_path, "train.csv", [("n0", "ghost1"), ("ghost2", "n1")])
    with pytest.raises(PairImportError, match=r"2 note ids .*not in the catalog.*'ghost1', 'ghost2'"):
        import_pairs(str(tmp_path / "out"), catalog, {"train": train})
    assert not os.path.exists(tmp_path / "out" / "pairs.parquet")  # nothing half-written


def test_a_note_in_train_and_test_is_refused_unless_allowed(tmp_path, catalog):
    train = _csv(tmp_path, "train.csv", [("n0", "n1")])
    test = _csv(tmp_path, "test.csv", [("n1", "n2")])
    with pytest.raises(PairImportError, match=r"note 'n1' is in the test and train pairs .*--allow-overlap"):
        import_pairs(str(tmp_path / "out"), catalog, {"train": train, "test": test})
    m = import_pairs(str(tmp_path / "out"), catalog, {"train": train, "test": test}, allow_overlap=True)
    assert m["notes_in_several_splits"] == 1
    split = dict(read_note_split(str(tmp_path / "out")).itertuples(index=False, name=None))
    assert split["n1"] == "test"  # the most held-out split: evaluation never treats it as training-only


@pytest.mark.parametrize("rows, header, match", [
    ([("n0", "n0")], None, "with itself"),
    ([("n0", "n1", "x")], None, "first row has 3 fields"),
    ([("n0", "")], None, "empty target_id"),
    ([("n0", "n1", "abc")], ("query_id", "target_id", "score"), "score is not a number"),
])
def test_bad_rows_name_the_file(tmp_path, catalog, rows, header, match):
    train = _csv(tmp_path, "train.csv", rows, header=header)
    with pytest.raises(PairImportError, match=match) as e:
        import_pairs(str(tmp_path / "out"), catalog, {"train": train})
    assert "train.csv" in str(e.value) or "itself" in str(e.value)


def test_inputs_must_be_one_form_with_train(tmp_path, catalog):
    val = _csv(tmp_path, "val.csv", [("n0", "n1")])
    with pytest.raises(PairImportError, match="--train file is needed"):
        import_pairs(str(tmp_path / "out"), catalog, {"val": val})
    with pytest.raises(PairImportError, match="either one file per split"):
        import_pairs(str(tmp_path / "out"), catalog, {"train": val}, pairs=val)


def test_cli_one_line_error_and_write_shards_reads_the_import(tmp_path):
    from tests.helpers.data import synthetic_catalog

    cat = synthetic_catalog(str(tmp_path / "cat"), n_notes=12, n_categories=2)
    ids = [json.loads(l)["note_id"] for l in open(cat)]
    train = _csv(tmp_path, "train.csv", [(ids[0], ids[1]), (ids[2], ids[3])])
    test = _csv(tmp_path, "test.csv", [(ids[6], ids[7])])
    run = lambda *a: subprocess.run([sys.executable, "-m", "notellm2.launcher", "data", *a], cwd=REPO, capture_output=True, text=True)  # noqa: E731
    bad = run("import-pairs", "--catalog", cat, "--out", str(tmp_path / "p"), "--train", str(tmp_path / "nope.csv"))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    ok = run("import-pairs", "--catalog", cat, "--out", str(tmp_path / "p"), "--train", train, "--test", test)
    assert ok.returncode == 0, ok.stderr
    shards = run("write-shards", "--pairs", str(tmp_path / "p"), "--catalog", cat, "--out", str(tmp_path / "s"))
    assert shards.returncode == 0, shards.stderr
    manifest = json.load(open(tmp_path / "s" / "manifest.json"))
    counts = manifest["counts"]
    assert (counts["train"]["pairs_written"], counts["train"]["notes_written"]) == (2, 4)
    assert (counts["test"]["pairs_written"], counts["test"]["notes_written"]) == (1, 2)  # the note split's test notes
