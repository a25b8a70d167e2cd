"""Per-note statistics of the training pairs (data_shards/writing/note_stats.py): computed by write-shards from
the train pairs it writes, loaded for a run, and added to every pair batch (sample_logq, known_pos)."""
from __future__ import annotations

import json
import math
import os

import pandas as pd
import pytest
import torch

from notellm2.data_shards.config import DataConfig
from notellm2.data_shards.ids import note_id_hash
from notellm2.data_shards.writing.note_stats import KNOWN_PAD, NOTE_STATS_FILE, NoteStats, NoteStatsError, compute_note_stats
from notellm2.data_shards.reader import PairLoader
from tests.helpers.data import synthetic_shards
from tests.helpers.shards import CharCollate, CharEncoder


def test_frequencies_and_known_positives_by_hand():
    pairs = [("a", "b", 0.5), ("a", "c", 0.9), ("d", "a", 0.1), ("b", "c", 0.3)]
    df = compute_note_stats(pairs, max_known=2).set_index("note_id")
    assert df["appearances"].to_dict() == {"a": 3, "b": 2, "c": 2, "d": 1}
    assert df.loc["a", "q"] == pytest.approx(3 / 8) and df["q"].sum() == pytest.approx(1.0)
    # partners either direction, best score first, at most 2: a's are c (0.9), b (0.5), d (0.1)
    assert list(df.loc["a", "known"]) == ["c", "b"]
    assert list(df.loc["d", "known"]) == ["a"] and list(df.loc["c", "known"]) == ["a", "b"]


def test_write_shards_writes_the_train_pairs_statistics(tmp_path):
    out, manifest = synthetic_shards(tmp_path, n_pairs=60, shard_size=32)
    entry = manifest["note_stats"]
    assert entry["file"] == NOTE_STATS_FILE and entry["split"] == "train"
    with open(os.path.join(out, "manifest.json")) as fh:
        assert json.load(fh)["note_stats"] == entry
    df = pd.read_parquet(os.path.join(out, NOTE_STATS_FILE))
    n_train = manifest["counts"]["train"]["pairs_written"]
    assert entry["pairs"] == n_train and int(df["appearances"].sum()) == 2 * n_train
    written = pd.read_parquet(os.path.join(str(tmp_path), "pairs", "pairs.parquet"))
    train_notes = set(written[written.split == "train"].query_id) | set(written[written.split == "train"].target_id)
    assert set(df["note_id"]) <= train_notes  # no validation or test pair counts


def test_the_loader_adds_log_frequency_and_known_positives(tmp_path):
    out, manifest = synthetic_shards(tmp_path, n_pairs=60, shard_size=32)
    stats = NoteStats(os.path.join(out, NOTE_STATS_FILE), logq=True, known=True)
    df = pd.read_parquet(os.path.join(out, NOTE_STATS_FILE)).set_index("note_id")
    loader = PairLoader(os.path.join(out, manifest["patterns"]["pairs-train"]),
                        data_cfg=DataConfig(num_workers=0, shuffle_buffer=0), encode_fn=CharEncoder(),
                        collate_text_fn=CharCollate(), rank=0, world_size=1, pairs_per_rank=4, note_stats=stats)
    batch = next(iter(loader))
    batch.check("test")  # the optional keys pass the contract
    ids = batch["note_id_strs"]
    assert batch["sample_logq"].dtype == torch.float32
    for i, n in enumerate(ids):
        assert batch["sample_logq"][i].item() == pytest.approx(math.log(df.loc[n, "q"]), rel=1e-6)
        row = [x for x in batch["known_pos"][i].tolist() if x != KNOWN_PAD]
        assert row == [note_id_hash(x) for x in df.loc[n, "known"]]
    b = len(ids) // 2
    for i in range(b):  # every pair's partner is among its query's known positives
        assert note_id_hash(ids[b + i]) in batch["known_pos"][i].tolist()
    # a note in no training pair: the floor (one appearance), no known positive
    assert stats.logq("never-seen") == pytest.approx(math.log(1 / df["appearances"].sum()))
    assert stats.known("never-seen") == []


def test_missing_statistics_are_refused_with_the_path_and_the_fix(tmp_path):
    with pytest.raises(NoteStatsError, match=rf"^{tmp_path}/{NOTE_STATS_FILE}: no note statistics .*write-shards"):
        NoteStats(str(tmp_path / NOTE_STATS_FILE), logq=True, known=False)


def test_a_run_asking_for_them_is_refused_before_the_model_loads(tmp_path):
    from notellm2.launcher.train.components import _note_stats
    from notellm2.launcher.config import ConfigError
    from tests.helpers.configs import tiny_config

    (tmp_path / "pairs-train-000000.tar").write_bytes(b"")
    cfg = tiny_config(None, f"data.train_shards={tmp_path}/pairs-train-000000.tar", "loss.mask_known_positives=true")
    with pytest.raises(ConfigError, match=r"^loss\.mask_known_positives: .*no note statistics"):
        _note_stats(cfg)
    assert _note_stats(tiny_config(None, f"data.train_shards={tmp_path}/pairs-train-000000.tar")) is None


def test_note_stats_cli_backfills_an_older_shard_set_with_the_same_file(tmp_path, capsys):
    """A shard set written before write-shards wrote note_stats.parquet: `notellm2 data note-stats` reads
    the train pairs back from the shards and writes the same statistics, and the manifest's entry."""
    from notellm2.launcher.cli import main

    out, manifest = synthetic_shards(tmp_path, n_pairs=60, shard_size=32)
    written = pd.read_parquet(os.path.join(out, NOTE_STATS_FILE))
    os.remove(os.path.join(out, NOTE_STATS_FILE))
    older = {k: v for k, v in manifest.items() if k != "note_stats"}
    with open(os.path.join(out, "manifest.json"), "w") as fh:
        json.dump(older, fh)
    assert main(["data", "note-stats", "--shards", out]) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(os.path.join(out, NOTE_STATS_FILE)), written)
    with open(os.path.join(out, "manifest.json")) as fh:
        assert json.load(fh)["note_stats"] == manifest["note_stats"]
    assert main(["data", "note-stats", "--shards", str(tmp_path / "nowhere")]) == 2
    assert "no shard manifest" in capsys.readouterr().err
