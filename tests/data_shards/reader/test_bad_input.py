"""Bad input: corrupted shards never crash or shorten an epoch; they are counted, logged once with
their key, and handled by data.bad_sample_policy."""
from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from notellm2.data_shards.config import DataConfig
from notellm2.data_shards.reader import NotesLoader
from tests.helpers.shards import (CharCollate, CharEncoder, huge_png_bytes, write_note_shards,
                                       write_pair_shards)
from tests.helpers.loaders import pair_loader

HUGE_PNG = None


def _huge():
    global HUGE_PNG
    if HUGE_PNG is None:
        HUGE_PNG = huge_png_bytes()
    return HUGE_PNG


def corrupt(s, i, sample):
    """Shard 0: garbage JPEG (pair 1), note JSON missing keys (pair 3), bomb PNG (pair 5),
    missing t.json (pair 7), JSON that is not JSON (pair 9)."""
    if s != 0:
        return sample
    if i == 1:
        sample["q.jpg"] = b"\xff\xd8\xff\xe0garbage" * 20
    elif i == 3:
        note = json.loads(sample["t.json"])
        del note["title"]
        sample["t.json"] = json.dumps(note).encode()
    elif i == 5:
        sample["t.jpg"] = _huge()
    elif i == 7:
        del sample["t.json"]
    elif i == 9:
        sample["q.json"] = b"{not json"
    return sample


def test_huge_png_is_small_on_disk_but_over_the_limit():
    data = _huge()
    assert len(data) < 1_000_000
    from notellm2.data_shards.images import BadImage, open_image
    with pytest.raises(BadImage, match="exceeds"):
        open_image(data, 10_000_000)


def test_drop_policy_counts_logs_once_and_keeps_full_batches(tmp_path, caplog):
    write_pair_shards(str(tmp_path), [12, 12], mutate=corrupt)
    loader = pair_loader(str(tmp_path / "pairs-train-*.tar"), num_workers=2, shuffle_buffer=4,
                         max_image_pixels=10_000_000, bad_sample_policy="drop")
    assert loader.batches_per_epoch == 6
    caplog.set_level(logging.WARNING, logger="notellm2.data_shards.reader")
    batches = list(loader)
    assert len(batches) == 6 and all(b["pixel_values"].shape[0] == 8 for b in batches)
    seen = {s for b in batches for s in b["note_id_strs"]}
    for bad in (1, 3, 5, 7, 9):  # none of the bad pairs is in a batch
        assert f"q{bad}" not in seen
    # the 5 dropped pairs were refilled from later passes; nothing bad was kept
    stats = loader.stats()
    # refill passes may meet a bad pair again: each is counted every time it is met
    assert set(stats["dropped"]) == {"bad_image", "missing_field", "image_over_pixel_limit", "missing_member",
                                     "bad_json"} and all(n >= 1 for n in stats["dropped"].values())
    assert stats["refill"].get("samples", 0) >= 1 and stats["batches"] == 6
    for key, reason in [("000000001", "bad_image"), ("000000003", "missing_field"),
                        ("000000005", "image_over_pixel_limit"), ("000000007", "missing_member"),
                        ("000000009", "bad_json")]:
        lines = [r.getMessage() for r in caplog.records if f"pairs-train-000000.tar/{key}" in r.getMessage()]
        assert len(lines) == 1 and reason in lines[0], (key, lines)
    # a second epoch meets the same bad samples again: counted again, not logged again
    caplog.clear()
    list(loader)
    assert not [r for r in caplog.records if "bad sample" in r.getMessage()]
    assert sum(loader.stats()["dropped"].values()) >= 10


def test_blank_image_policy_keeps_pairs_with_bad_images_only(tmp_path):
    write_pair_shards(str(tmp_path), [12, 12], mutate=corrupt)
    loader = pair_loader(str(tmp_path / "pairs-train-*.tar"), num_workers=0, shuffle_buffer=4,
                         max_image_pixels=10_000_000, bad_sample_policy="blank_image",
                         B=7)  # 21 good pairs: one pass, no refill
    rows = {}
    for b in loader:
        for r, s in enumerate(b["note_id_strs"]):
            rows[s] = (bool(b["has_image"][r]), float(b["pixel_values"][r].abs().sum()), int(b["input_ids"][r, 0]))
    assert rows["q1"] == (False, 0.0, 1)  # garbage JPEG: kept, blank, and the prompt says no image
    assert rows["t5"] == (False, 0.0, 1)  # over the pixel limit: kept, blank
    assert rows["t1"][0] and rows["q5"][0]
    for gone in ("q3", "q7", "q9"):  # text problems cannot be blanked: dropped
        assert gone not in rows
    stats = loader.stats()
    assert stats["blanked"] == {"bad_image": 1, "image_over_pixel_limit": 1}
    assert stats["dropped"] == {"missing_field": 1, "missing_member": 1, "bad_json": 1}


def test_truncated_shard_is_reported_and_epoch_stays_full(tmp_path, caplog):
    paths = write_pair_shards(str(tmp_path), [12, 12, 12])
    size = os.path.getsize(paths[1])
    with open(paths[1], "r+b") as fh:
        fh.truncate(size // 2 + 300)  # cut inside a member
    caplog.set_level(logging.WARNING, logger="notellm2.data_shards.reader")
    loader = pair_loader(str(tmp_path / "pairs-train-*.tar"), num_workers=2, shuffle_buffer=4,
                         max_image_pixels=10_000_000, bad_sample_policy="drop")
    assert loader.batches_per_epoch == 9  # from the manifest: 36 // 4
    batches = list(loader)
    assert len(batches) == 9 and all(len(b["note_id_strs"]) == 8 for b in batches)
    assert loader.stats()["shard_problems"] == 1
    assert any("pairs-train-000001.tar" in r.getMessage() and "truncated" in r.getMessage() for r in caplog.records)
    # the same but cut exactly at a member boundary (no end-of-archive marker)
    os.truncate(paths[2], 10240)
    loader = pair_loader(str(tmp_path / "pairs-train-*.tar"), num_workers=2, shuffle_buffer=4,
                         max_image_pixels=10_000_000, bad_sample_policy="drop")
    assert len(list(loader)) == 9 and loader.stats()["shard_problems"] == 2


def test_a_shard_of_garbage_does_not_stop_the_epoch(tmp_path):
    paths = write_pair_shards(str(tmp_path), [12, 12])
    with open(paths[0], "wb") as fh:
        fh.write(os.urandom(5000))
    loader = pair_loader(str(tmp_path / "pairs-train-*.tar"), num_workers=2, shuffle_buffer=4,
                         max_image_pixels=10_000_000, bad_sample_policy="drop")
    batches = list(loader)
    assert len(batches) == 6 and loader.stats()["shard_problems"] == 1
    assert all(s[1:] and int(s[1:]) >= 12 for b in batches for s in b["note_id_strs"])


@pytest.mark.parametrize("workers", [0, 2])
def test_all_bad_data_fails_clearly_instead_of_hanging(tmp_path, workers):
    """Every image garbage: one UserError line (not a worker's traceback), which names the counts and the
    bad-sample log; the log exists and lists the samples (the line once pointed at a log never written)."""
    from notellm2.data_shards.reader import NoUsableData
    from notellm2.errors import UserError

    write_pair_shards(str(tmp_path), [8], mutate=lambda s, i, smp: {**smp, "q.jpg": b"garbage", "t.jpg": b"garbage"})
    log_path = tmp_path / "logs" / "bad.jsonl"
    with pytest.raises(NoUsableData, match="no usable pair") as e:
        list(pair_loader(str(tmp_path / "pairs-train-*.tar"), num_workers=workers, shuffle_buffer=4,
                         max_image_pixels=10_000_000, bad_sample_policy="drop", bad_sample_log=str(log_path)))
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)
    assert "dropped: bad_image" in str(e.value) and str(log_path) in str(e.value)
    logged = [json.loads(line) for line in open(log_path)]
    samples = [r["sample"] for r in logged]
    every = {f"pairs-train-000000.tar/{i:09d}" for i in range(8)}
    # each sample once; one process sees them all, with workers the log holds what reached the rank first
    assert len(samples) == len(set(samples)) and (set(samples) == every if workers == 0 else set(samples) <= every)
    assert samples and {(r["reason"], r["action"]) for r in logged} == {("bad_image", "dropped")}


def test_notes_loader_blanks_bad_images_and_flags_unreadable_notes(tmp_path):
    def mutate(s, i, sample):
        if s == 0 and i == 1:
            sample["jpg"] = b"garbage"
        if s == 0 and i == 3:
            sample["json"] = b'{"note_id": "n3"}'
        return sample
    write_note_shards(str(tmp_path), [6], mutate=mutate)
    cfg = DataConfig(num_workers=0, random_flip=True)
    loader = NotesLoader(str(tmp_path / "notes-test-*.tar"), cfg, CharEncoder(), CharCollate(), rank=0,
                         world_size=1, batch_size=6, image_size=32)
    (batch,) = list(loader)
    assert batch["note_id_strs"][1] == "n1" and not batch["has_image"][1]
    assert batch["is_dummy"].tolist() == [False, False, False, True, False, False]
    assert int(batch["note_ids"][3]) == -1
    assert loader.stats()["blanked"] == {"bad_image": 1} and loader.stats()["unusable"] == {"missing_field": 1}
    # never a random flip at inference, whatever data.random_flip says
    from notellm2.data_shards.images import clip_transform, open_image
    from tests.helpers.shards import jpeg_bytes
    assert torch.equal(batch.to_device(torch.device("cpu"))["pixel_values"][0], clip_transform(open_image(jpeg_bytes(0)), 32))
