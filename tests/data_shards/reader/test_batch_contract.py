"""The batch contract (data_shards/batch.py): what the loaders yield, what check() refuses, what
to_device() gives; and the pair loader's _WorkerCursor counts."""
from __future__ import annotations

import itertools

import pytest
import torch

from notellm2.data_shards.batch import BatchError, NoteBatch, PairBatch, normalize_pixels, to_device
from notellm2.data_shards.config import DataConfig
from notellm2.data_shards.images import CLIP_MEAN, CLIP_STD
from notellm2.data_shards.reader.pair_loader import _WorkerCursor
from notellm2.data_shards.reader import NotesLoader, PairLoader
from tests.helpers.shards import CharCollate, CharEncoder, write_note_shards, write_pair_shards

CPU = torch.device("cpu")


def _pair_batch(tmp_path, B=3, S=16) -> PairBatch:
    write_pair_shards(str(tmp_path), [8])
    loader = PairLoader(str(tmp_path / "pairs-train-*.tar"), data_cfg=DataConfig(num_workers=0, shuffle_buffer=0),
                        encode_fn=CharEncoder(), collate_text_fn=CharCollate(), rank=0, world_size=1,
                        pairs_per_rank=B, image_size=S)
    return next(iter(loader))


def test_pair_batch_keys_dtypes_and_shapes(tmp_path):
    B, S = 3, 16
    batch = _pair_batch(tmp_path, B, S)
    assert type(batch) is PairBatch and batch.num_rows == 2 * B
    spec = {"pixel_values": (torch.uint8, (2 * B, 3, S, S)), "image_present": (torch.bool, (2 * B,)),
            "has_image": (torch.bool, (2 * B,)), "note_ids": (torch.int64, (2 * B,))}
    for key, (dtype, shape) in spec.items():
        assert batch[key].dtype == dtype and tuple(batch[key].shape) == shape, key
    assert len(batch["note_id_strs"]) == 2 * B and len(batch["sample_keys"]) == B
    assert batch["input_ids"].shape[0] == 2 * B  # a text key of collate_text_fn
    assert {f.key for f in PairBatch.FIELDS} <= set(batch)
    assert batch.check() is batch


def test_notes_batch_is_a_checked_note_batch_with_uint8_pixels(tmp_path):
    write_note_shards(str(tmp_path), [5])
    (batch,) = list(NotesLoader(str(tmp_path / "notes-test-*.tar"), DataConfig(num_workers=0), CharEncoder(),
                                CharCollate(), rank=0, world_size=1, batch_size=8, image_size=16))
    assert type(batch) is NoteBatch and batch.check() is batch
    assert batch["pixel_values"].dtype == torch.uint8 and tuple(batch["pixel_values"].shape) == (8, 3, 16, 16)
    assert batch["is_dummy"].tolist() == [False] * 5 + [True] * 3


@pytest.mark.parametrize("change,match", [
    (lambda b: b.pop("image_present"), "has no 'image_present'"),
    (lambda b: b.__setitem__("note_ids", b["note_ids"].int()), r"\['note_ids'\]: expected torch.int64"),
    (lambda b: b.__setitem__("has_image", b["has_image"][:-1]), r"\['has_image'\]: expected torch.bool with 1 dims and 6 rows"),
    (lambda b: b.__setitem__("sample_keys", b["sample_keys"][:1]), r"\['sample_keys'\]: expected a list of 3 str"),
    (lambda b: b.__setitem__("pixel_values", b["pixel_values"][:, :1]), r"\['pixel_values'\]: expected \[N, 3, S, S\]"),
    (lambda b: b.__setitem__("input_ids", b["input_ids"][:4]), r"\['input_ids'\]: 4 rows for a batch of 6"),
])
def test_check_names_the_key_that_breaks_the_contract(tmp_path, change, match):
    batch = _pair_batch(tmp_path)
    change(batch)
    with pytest.raises(BatchError, match=match):
        batch.check("PairLoader")


def test_to_device_moves_normalises_and_keeps_the_kind(tmp_path):
    batch = _pair_batch(tmp_path)
    moved = batch.to_device(CPU)
    assert type(moved) is PairBatch and moved.check() is moved
    assert moved["pixel_values"].dtype == torch.float32 and moved["pixel_values"].is_contiguous()
    assert moved["sample_keys"] == batch["sample_keys"] and torch.equal(moved["input_ids"], batch["input_ids"])
    assert batch["pixel_values"].dtype == torch.uint8  # the loader's batch is left as it was
    assert torch.equal(to_device(moved, CPU)["pixel_values"], moved["pixel_values"])  # twice: no second normalising
    # a plain mapping (a test double's batch) comes back a plain dict
    plain = to_device({"pixel_values": torch.zeros(2, 3, 4, 4), "x": 1}, CPU)
    assert type(plain) is dict and plain["x"] == 1
    with pytest.raises(BatchError, match="need 'image_present'"):
        to_device({"pixel_values": torch.zeros(2, 3, 4, 4, dtype=torch.uint8)}, CPU)


def test_normalize_pixels_is_the_float32_clip_formula_and_blanks_rows_without_an_image():
    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (3, 4, 4, 3), dtype=torch.uint8, generator=g).permute(0, 3, 1, 2)  # channels-last view
    present = torch.tensor([True, False, True])
    out = normalize_pixels(u8, present)
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    ref = (u8.double() / 255 - mean.double()) / std.double()
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert float((out[present].double() - ref[present]).abs().max()) < 1e-5
    assert not out[1].any()


# ----------------------------------------------------------------------------- _WorkerCursor

def _candidates(passes):
    """(pass, path, sample) for passes = [n samples in pass 0, n in pass 1, ...]."""
    for p, n in enumerate(passes):
        for i in range(n):
            yield p, f"shard{p}", (f"k{p}-{i}", ())


def test_cursor_skips_by_count_and_counts_usable_pairs_per_pass():
    cur = _WorkerCursor.at(_candidates([3, 2, 2]), 2)
    assert (cur.consumed, cur.pass_no, cur.usable_in_pass) == (2, -1, 0)  # skipped, not taken
    assert cur.take(False, 0, 0)[0] == 0 and (cur.consumed, cur.pass_no) == (3, 0)
    cur.usable(False)
    assert cur.usable_in_pass == 1
    assert cur.take(False, 0, 0)[0] == 1  # into refill pass 1: its count starts again
    assert (cur.consumed, cur.pass_no, cur.usable_in_pass) == (4, 1, 0)
    cur.usable(False)
    cur.take(False, 0, 0)
    assert (cur.pass_no, cur.usable_in_pass, cur.unusable_run) == (1, 1, 0)


def test_cursor_fails_after_a_refill_pass_without_a_usable_pair():
    cur = _WorkerCursor(_candidates([1, 2, 1]))
    cur.take(False, 3, 7)  # pass 0 without a usable pair: the planned pass may be all bad, refill follows
    cur.take(False, 3, 7)
    cur.take(False, 3, 7)  # pass 1, nothing usable in it
    with pytest.raises(RuntimeError, match="rank 3: a whole refill pass over its shards gave no usable pair \\(epoch 7\\)"):
        cur.take(False, 3, 7)


def test_resampled_cursor_counts_unusable_candidates_in_a_row():
    cur = _WorkerCursor(iter((d, "s", ("k", ())) for d in itertools.count()))
    for _ in range(5):
        cur.take(True, 0, 0)
    assert (cur.consumed, cur.unusable_run, cur.pass_no) == (5, 5, -1)  # resampled: no passes
    cur.usable(True)
    assert cur.unusable_run == 0 and cur.usable_in_pass == 0
    for _ in range(10_000 + 10 * 2):
        cur.take(True, 0, 0)
    cur.check_resampled(0, 2)  # at the limit: still going
    cur.take(True, 0, 0)
    with pytest.raises(RuntimeError, match="10021 resampled candidates in a row were unusable"):
        cur.check_resampled(0, 2)
