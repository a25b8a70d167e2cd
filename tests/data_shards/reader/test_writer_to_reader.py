"""End to end: catalog -> pairs -> notellm2.data_shards.writing.shards shards -> PairLoader / NotesLoader."""
from __future__ import annotations

import os

import pandas as pd

from notellm2.data_shards.config import DataConfig
from notellm2.data_shards.ids import note_id_hash
from notellm2.data_shards.reader import NotesLoader, PairLoader
from tests.helpers.shards import CharCollate, CharEncoder
from tests.helpers.data import synthetic_shards


def test_reader_reads_what_the_writer_wrote(tmp_path):
    out, manifest = synthetic_shards(tmp_path, n_pairs=120, shard_size=32)
    pattern = os.path.join(out, manifest["patterns"]["pairs-train"])
    B = 8
    loader = PairLoader(pattern, data_cfg=DataConfig(num_workers=2, shuffle_buffer=16), encode_fn=CharEncoder(),
                        collate_text_fn=CharCollate(), rank=0, world_size=1, pairs_per_rank=B)
    n_train = sum(s["count"] for s in manifest["shards"] if s["kind"] == "pairs" and s["split"] == "train")
    assert loader.batches_per_epoch == n_train // B
    written = pd.read_parquet(os.path.join(str(tmp_path), "pairs", "pairs.parquet"))
    train = set(zip(written[written.split == "train"].query_id, written[written.split == "train"].target_id))
    seen = []
    for batch in loader:
        assert batch["pixel_values"].shape == (2 * B, 3, 224, 224)
        ids = batch["note_id_strs"]
        for i in range(B):
            assert (ids[i], ids[B + i]) in train  # query i really pairs with target i
        assert batch["note_ids"].tolist() == [note_id_hash(s) for s in ids]
        seen.extend(zip(ids[:B], ids[B:]))
    assert len(seen) == len(set(seen)) == (n_train // B) * B
    assert sum(loader.stats()["dropped"].values()) == 0 and loader.stats()["shard_problems"] == 0

    notes_pattern = os.path.join(out, manifest["patterns"]["notes-train"])
    notes = NotesLoader(notes_pattern, DataConfig(num_workers=0), CharEncoder(), CharCollate(), rank=0,
                        world_size=1, batch_size=16, image_size=32)
    got = [s for b in notes for s, d in zip(b["note_id_strs"], b["is_dummy"].tolist()) if not d]
    n_notes = sum(s["count"] for s in manifest["shards"] if s["kind"] == "notes" and s["split"] == "train")
    assert len(got) == len(set(got)) == n_notes
    assert {q for q, _ in train} | {t for _, t in train} <= set(got)
