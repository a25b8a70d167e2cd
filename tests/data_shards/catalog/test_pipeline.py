"""The data path as a user runs it: catalog -> validate -> views -> mine-pairs -> write-shards."""
import json
import os

import pandas as pd

from notellm2.data_shards.catalog.notes import load_catalog
from notellm2.launcher.cli import main
from tests.helpers.data import synthetic_catalog, synthetic_views


def test_views_to_mined_pairs_to_shards(tmp_path, capsys):
    cat = synthetic_catalog(tmp_path / "cat", n_notes=80, n_categories=4)
    assert main(["data", "validate", "--catalog", cat, "--workers", "1", "--no-progress"]) == 0
    views = synthetic_views(cat, tmp_path / "views.csv", n_users=40)
    pairs = str(tmp_path / "pairs")
    assert main(["data", "mine-pairs", "--views", views, "--out", pairs, "--split-by", "hash",
                 "--val-fraction", "0.15", "--test-fraction", "0.15", "--threads", "1", "--quiet"]) == 0
    shards = str(tmp_path / "shards")
    assert main(["data", "write-shards", "--pairs", pairs, "--catalog", cat, "--out", shards, "--shard-size", "64",
                 "--image-size", "32", "--workers", "1", "--no-progress"]) == 0
    capsys.readouterr()
    m = json.load(open(os.path.join(shards, "manifest.json")))
    mined = pd.read_parquet(os.path.join(pairs, "pairs.parquet"))
    category = {n.note_id: n.category for n in load_catalog(cat)}
    for split in ("train", "val", "test"):
        c = m["counts"][split]
        assert c["pairs_in"] == int((mined.split == split).sum()) == c["pairs_written"] > 0
    # Every mined pair was written (every mined note is in the catalog), and the synthetic
    # sessions keep most of them within a category.
    same = (mined.query_id.map(category) == mined.target_id.map(category)).mean()
    assert same > 0.7, same
    assert m["sources"]["mining_manifest"]["sha256"]
    # notes-test holds exactly the test notes of the mining's note split (not the train partners
    # that test pairs also touch in the default "either" pair split).
    import tarfile

    from notellm2.data_shards.mining.pairs_file import read_note_split

    note_split = read_note_split(pairs)
    in_test_pairs = set(mined[mined.split == "test"].query_id) | set(mined[mined.split == "test"].target_id)
    test_notes = set(note_split[note_split.split == "test"].note_id)
    written = set()
    for name in sorted(os.listdir(shards)):
        if name.startswith("notes-test-"):
            with tarfile.open(os.path.join(shards, name)) as tf:
                written |= {json.load(tf.extractfile(x))["note_id"] for x in tf.getmembers() if x.name.endswith(".json")}
    assert written == test_notes and len(in_test_pairs - test_notes) > 0
    assert main(["data", "validate", "--shards", shards]) == 0
