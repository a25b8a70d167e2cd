"""Pixels from the loader workers through reused shared-memory slots (pixel_slots.PixelSlots): same
batches as in one process, the fallback when a worker has no free slot, and when /dev/shm is small."""
from __future__ import annotations

import logging
import multiprocessing
import os

import torch

import notellm2.data_shards.reader.pixel_slots as pixel_slots
import notellm2.data_shards.reader.shard_index as shard_index
from notellm2.data_shards.batch import to_device
from notellm2.data_shards.config import DataConfig
from notellm2.data_shards.reader import NotesLoader
from tests.helpers.shards import CharCollate, CharEncoder, write_note_shards, write_pair_shards
from tests.helpers.loaders import pair_loader


def assert_same_batches(got: list, want: list):
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        assert g["note_id_strs"] == w["note_id_strs"] and g["sample_keys"] == w["sample_keys"]
        assert g["pixel_values"].shape == w["pixel_values"].shape and g["pixel_values"].dtype == w["pixel_values"].dtype
        assert torch.equal(g["pixel_values"], w["pixel_values"])
        assert torch.equal(g["image_present"], w["image_present"]) and torch.equal(g["input_ids"], w["input_ids"])


def test_slot_claim_take_and_free():
    slots = pixel_slots.PixelSlots(workers=2, rows=4, image_size=8, slots=2)
    s0, buf0 = slots.claim(0)
    s1, buf1 = slots.claim(0)
    assert (s0, s1) == (0, 1) and slots.claim(0) is None  # worker 0 has no free slot left ...
    assert slots.claim(1) is not None                     # ... which does not touch worker 1's
    buf0.copy_(torch.arange(4 * 8 * 8 * 3).reshape(4, 8, 8, 3).to(torch.uint8))
    got = slots.take(0, s0, 3)
    assert got.shape == (3, 3, 8, 8) and torch.equal(got, buf0[:3].permute(0, 3, 1, 2))
    buf0.zero_()  # the taken rows are a copy: the worker may refill the slot at once
    assert int(got.sum()) > 0
    assert slots.claim(0)[0] == s0  # freed by take
    try:
        slots.take(1, 1, 2)
    except RuntimeError as e:
        assert "arrived empty" in str(e)
    else:
        raise AssertionError("taking a slot nobody filled must fail")


def test_pairs_and_notes_through_slots_equal_the_in_process_batches(tmp_path):
    write_pair_shards(str(tmp_path), [8, 7, 9])
    pattern = str(tmp_path / "pairs-train-*.tar")
    want = list(pair_loader(pattern, B=3, num_workers=0))
    loader = pair_loader(pattern, B=3, num_workers=2)
    got = list(loader)
    assert_same_batches(got, want)
    assert loader.pixel_transport == {"slots": len(got), "ordinary": 0}
    # channels-last uint8 view [N,3,S,S]; on the device (to_device) the same float32 batches either way
    assert got[0]["pixel_values"].dtype == torch.uint8 and got[0]["pixel_values"].shape == (6, 3, 32, 32)
    cpu = torch.device("cpu")
    assert_same_batches([to_device(b, cpu) for b in got], [to_device(b, cpu) for b in want])

    notes_dir = tmp_path / "notes"
    write_note_shards(str(notes_dir), [5, 6])
    kw = dict(encode_fn=CharEncoder(), collate_text_fn=CharCollate(), rank=0, world_size=1, batch_size=4,
              image_size=32)
    nref = list(NotesLoader(str(notes_dir / "*.tar"), DataConfig(num_workers=0), **kw))
    notes = NotesLoader(str(notes_dir / "*.tar"), DataConfig(num_workers=2), **kw)
    got_notes = list(notes)
    assert len(got_notes) == len(nref) == 3 and notes.pixel_transport == {"slots": 3, "ordinary": 0}
    for g, w in zip(got_notes, nref):
        assert g["note_id_strs"] == w["note_id_strs"] and torch.equal(g["pixel_values"], w["pixel_values"])


def test_a_worker_without_a_free_slot_sends_its_pixels_the_ordinary_way(tmp_path, monkeypatch):
    """One slot per worker and a consumer that stalls: the workers run ahead, find their slot still
    taken and send those batches' pixels through fresh shared memory; nothing is lost or overwritten.

    The consumer stalls until a worker has reported a full slot (an event the forked workers inherit,
    set by the slots' own claim), so the fallback is certain to have been taken, however slow the box."""
    monkeypatch.setattr(pixel_slots, "SLOTS_PER_WORKER", 1)
    full = multiprocessing.get_context("fork").Event()
    real_claim = pixel_slots.PixelSlots.claim

    def claim(self, worker):
        got = real_claim(self, worker)
        if got is None:
            full.set()
        return got

    monkeypatch.setattr(pixel_slots.PixelSlots, "claim", claim)
    write_pair_shards(str(tmp_path), [12, 12])
    pattern = str(tmp_path / "pairs-train-*.tar")
    want = list(pair_loader(pattern, B=3, num_workers=0))
    loader = pair_loader(pattern, B=3, num_workers=2)
    it = iter(loader)
    got = [next(it)]
    # worker 1 holds batch 1 in its only slot until the consumer takes it, and batch 3 is already asked of it
    assert full.wait(120), "no worker found its slot taken while the consumer stalled"
    got += list(it)
    assert_same_batches(got, want)
    assert loader.pixel_transport["ordinary"] >= 1 and loader.pixel_transport["slots"] >= 1
    assert sum(loader.pixel_transport.values()) == len(want)


def test_little_shared_memory_or_the_switch_off_use_the_ordinary_way(tmp_path, monkeypatch, caplog):
    write_pair_shards(str(tmp_path), [8, 8])
    pattern = str(tmp_path / "pairs-train-*.tar")
    want = list(pair_loader(pattern, B=3, num_workers=0))

    off = pair_loader(pattern, B=3, num_workers=2, pixel_slots=False)
    assert_same_batches(list(off), want)
    assert off.pixel_transport == {"slots": 0, "ordinary": len(want)}

    class Tiny:  # a nearly full /dev/shm: 64 KiB left
        f_bavail, f_frsize = 16, 4096

    real_statvfs = os.statvfs
    monkeypatch.setattr(pixel_slots.os, "statvfs", lambda p: Tiny() if p == "/dev/shm" else real_statvfs(p))
    monkeypatch.setattr(pixel_slots, "_LOGGED_ONCE", set())
    caplog.set_level(logging.WARNING, logger="notellm2.data_shards.reader")
    small = pair_loader(pattern, B=3, num_workers=2)
    assert_same_batches(list(small), want)
    assert small.pixel_transport == {"slots": 0, "ordinary": len(want)}
    assert list(small) and small.pixel_transport["slots"] == 0  # the next epoch too, without a second warning
    warnings = [r.getMessage() for r in caplog.records if "pixel slots" in r.getMessage()]
    assert len(warnings) == 1 and "/dev/shm has 0.1 MiB free" in warnings[0] and "--shm-size" in warnings[0]


def test_loader_leaves_the_callers_frozen_objects_frozen(tmp_path):
    """The loaders freeze the heap while forking and when indexing; objects the caller froze itself
    stay frozen, and the loader leaves nothing frozen behind when the caller froze nothing."""
    import gc

    write_pair_shards(str(tmp_path), [6, 6])
    pattern = str(tmp_path / "pairs-train-*.tar")
    assert gc.get_freeze_count() == 0
    assert len(list(pair_loader(pattern, B=3, num_workers=1))) == 4
    assert gc.get_freeze_count() == 0
    sentinel = [object()]  # a tracked container; frozen objects are not in gc.get_objects()
    gc.freeze()
    try:
        assert not any(o is sentinel for o in gc.get_objects())
        shard_index._INDEX_CACHE.clear()  # index again, under the caller's freeze
        assert len(list(pair_loader(pattern, B=3, num_workers=1))) == 4
        assert not any(o is sentinel for o in gc.get_objects()), "the loader unfroze the caller's objects"
    finally:
        gc.unfreeze()
    assert any(o is sentinel for o in gc.get_objects())
