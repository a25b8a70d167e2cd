"""Real 2-rank runs (torchrun, gloo): equal batches per rank with unequal shards and dropped
samples, disjoint data across ranks, notes exactly once, and resuming at another world size."""
from __future__ import annotations

import json
import logging

from notellm2.data_shards.config import DataConfig
from notellm2.data_shards.reader import PairLoader
from tests.helpers.shards import CharCollate, CharEncoder, write_note_shards, write_pair_shards
from tests.helpers.multirank import run_ranks


def _garbage_in_shard_1(s, i, sample):
    if s == 1 and i in (0, 2):
        sample["q.jpg"] = b"not an image"
    return sample


def test_two_ranks_unequal_shards_equal_batches_and_resume_at_one_rank(tmp_path, caplog):
    pair_dir, notes_dir = str(tmp_path / "pairs"), str(tmp_path / "notes")
    counts = [13, 6, 11, 9, 7]  # 5 shards over 2 ranks: 3 and 2 shards, unequal pairs
    write_pair_shards(pair_dir, counts, mutate=_garbage_in_shard_1)
    write_note_shards(notes_dir, [7, 5, 6])  # 18 notes, 2 ranks x 4: 3 batches each, 6 padding rows
    B = 3
    res = run_ranks("tests.data_shards.reader.dist_cases:pair_epochs", nproc=2, timeout=240,
                    kwargs={"pair_dir": pair_dir, "notes_dir": notes_dir, "B": B, "notes_B": 4, "num_workers": 2, "epochs": 2,
                            "take": 2})
    r0, r1 = res.returns[0], res.returns[1]
    for e in range(2):
        e0, e1 = r0["epochs"][e], r1["epochs"][e]
        assert e0["planned"] == e1["planned"] > 0
        assert len(e0["keys"]) == len(e1["keys"]) == e0["planned"] * B
        shards0 = {k.split("/")[0] for k in e0["keys"]}
        shards1 = {k.split("/")[0] for k in e1["keys"]}
        assert not shards0 & shards1  # explicit node split: disjoint shards
        assert len(set(e0["keys"])) == len(e0["keys"])
    assert r0["epochs"][0]["keys"] != r0["epochs"][1]["keys"]
    assert r0["stats"]["dropped"].get("bad_image", 0) + r1["stats"]["dropped"].get("bad_image", 0) >= 2

    # notes: every note exactly once across ranks, the same number of batches on each
    n0, n1 = r0["notes"], r1["notes"]
    assert n0["batches"] == n1["batches"] == n0["len"] == 3 and n0["rows"] == n1["rows"] == 12
    assert sorted(n0["ids"] + n1["ids"]) == sorted(f"n{j}" for j in range(18))

    # resume the 2-rank position (2 batches taken) on 1 rank with 1 worker
    states = [json.loads(json.dumps(res.returns[r]["state"])) for r in (0, 1)]
    caplog.set_level(logging.WARNING, logger="notellm2.data_shards.reader")
    one = PairLoader(f"{pair_dir}/pairs-train-*.tar", data_cfg=DataConfig(num_workers=1, shuffle_buffer=4),
                     encode_fn=CharEncoder(), collate_text_fn=CharCollate(), rank=0, world_size=1,
                     pairs_per_rank=B, image_size=32)
    one.load_state_dict(states)
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "resuming epoch 0 at world size 1" in msg and "remaining shard" in msg
    consumed = {k.split("/")[0] for r in (r0, r1) for k in r["taken_keys"]}
    rest = [k for b in one for k in b["sample_keys"]]
    rest_shards = {k.split("/")[0] for k in rest}
    assert rest and not rest_shards & consumed  # no consumed shard is repeated
    all_shards = {f"pairs-train-{s:06d}.tar" for s in range(len(counts))}
    assert rest_shards == all_shards - consumed  # and the others are read
    assert one.epoch == 1 and one.batches_per_epoch == sum(counts) // B  # next epoch: all shards again
