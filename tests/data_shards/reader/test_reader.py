"""PairLoader in one process: batch layout, image transform, shuffling, exact resume, errors."""
from __future__ import annotations

import io
import itertools
import json
import os

import pytest
import torch

import notellm2.data_shards.reader.samples as samples
from notellm2.data_shards.batch import to_device
from notellm2.data_shards.config import DataConfig
from notellm2.data_shards.ids import note_id_hash
from notellm2.data_shards.images import clip_transform, open_image
from notellm2.data_shards.reader import PairLoader, expand_shards
from tests.helpers.shards import CharCollate, CharEncoder, batch_digest, write_pair_shards
from tests.helpers.loaders import pair_loader


def pair_numbers(batch) -> list[int]:
    B = len(batch["note_id_strs"]) // 2
    return [int(s[1:]) for s in batch["note_id_strs"][:B]]


def test_batch_layout_queries_then_targets(tmp_path):
    paths = write_pair_shards(str(tmp_path), [6, 6])
    loader = pair_loader(str(tmp_path / "pairs-train-{000000..000001}.tar"), B=4, image_size=224, shuffle_buffer=0)
    batch = next(iter(loader))
    B = 4
    assert batch["pixel_values"].shape == (2 * B, 3, 224, 224) and batch["pixel_values"].dtype == torch.uint8
    assert batch["input_ids"].shape[0] == 2 * B and batch["attention_mask"].shape == batch["input_ids"].shape
    assert batch["has_image"].dtype == torch.bool and batch["note_ids"].dtype == torch.long
    ids = batch["note_id_strs"]
    for i in range(B):  # query i pairs with target i
        assert ids[i].startswith("q") and ids[B + i] == "t" + ids[i][1:]
    assert batch["note_ids"].tolist() == [note_id_hash(s) for s in ids]
    # every 7th pair's query (j % 7 == 3) has no image: flag and blank pixels, and the prompt knows it
    for row, s in enumerate(ids):
        expect = not (s.startswith("q") and int(s[1:]) % 7 == 3)
        assert bool(batch["has_image"][row]) == expect
        assert int(batch["input_ids"][row, 0]) == (2 if expect else 1)
        if not expect:
            assert float(batch["pixel_values"][row].abs().sum()) == 0.0
    # pixels are exactly the CLIP transform of the stored JPEG (no flip by default)
    import tarfile
    shard, key = batch["sample_keys"][0].split("/", 1)
    with tarfile.open(tmp_path / shard) as tf:
        raw = tf.extractfile(f"{key}.t.jpg").read()
    assert torch.equal(to_device(batch, torch.device("cpu"))["pixel_values"][B], clip_transform(open_image(raw), 224))
    assert len(batch["sample_keys"]) == B and shard in [os.path.basename(p) for p in paths]


def test_uint8_pixels_for_the_device_normalise_to_the_same_values(tmp_path):
    """The loader yields uint8 pixels; the batch's to_device (what the trainer calls) normalises them
    on its device to exactly the old float path: clip_transform of the stored JPEG, zeros without one."""
    import tarfile

    from notellm2.data_shards.batch import to_device as move_batch

    write_pair_shards(str(tmp_path), [6, 6])
    pattern = str(tmp_path / "pairs-train-{000000..000001}.tar")
    raws = list(pair_loader(pattern, B=4, image_size=32))
    assert len(raws) == 3
    for raw in raws:
        assert raw["pixel_values"].dtype == torch.uint8
        moved = raw.to_device(torch.device("cpu"))
        assert type(moved) is type(raw) and moved["note_id_strs"] == raw["note_id_strs"]
        assert moved["pixel_values"].dtype == torch.float32 and moved["pixel_values"].is_contiguous()
        assert torch.equal(move_batch(raw, torch.device("cpu"))["pixel_values"], moved["pixel_values"])
        for row, nid in enumerate(raw["note_id_strs"]):
            if not raw["image_present"][row]:
                assert not moved["pixel_values"][row].any()  # the mean colour
                continue
            shard, key = raw["sample_keys"][row % 4].split("/", 1)
            with tarfile.open(tmp_path / shard) as tf:
                jpg = tf.extractfile(f"{key}.{'q' if row < 4 else 't'}.jpg").read()
            assert torch.equal(moved["pixel_values"][row], clip_transform(open_image(jpg), 32)), nid
    # rows without an image were among them
    assert not all(bool(raw["image_present"].all()) for raw in raws)


def test_epoch_uses_each_pair_at_most_once_and_shuffles_by_seed_and_epoch(tmp_path):
    write_pair_shards(str(tmp_path), [10, 10, 10])
    pattern = str(tmp_path / "pairs-train-*.tar")
    loader = pair_loader(pattern, B=4)
    assert loader.batches_per_epoch == 30 // 4
    ep0 = [pair_numbers(b) for b in loader]
    assert len(ep0) == 7 and loader.epoch == 1
    flat = [n for b in ep0 for n in b]
    assert len(set(flat)) == len(flat) == 28
    ep1 = [pair_numbers(b) for b in loader]
    assert ep1 != ep0  # a new epoch, a new order
    again = pair_loader(pattern, B=4)
    assert [pair_numbers(b) for b in again] == ep0  # same seed and epoch, same order
    other = pair_loader(pattern, B=4, seed=1)
    assert [pair_numbers(b) for b in other] != ep0


def test_worker_count_does_not_change_batches(tmp_path):
    write_pair_shards(str(tmp_path), [9, 7, 8])
    pattern = str(tmp_path / "pairs-train-*.tar")
    inproc = [batch_digest(b) for b in pair_loader(pattern, B=3, num_workers=0)]
    workers = [batch_digest(b) for b in pair_loader(pattern, B=3, num_workers=2)]
    assert len(inproc) == 8 and inproc == workers


def _corrupt_one(s, i, sample):
    if s == 1 and i == 2:
        sample["t.jpg"] = b"\xff\xd8\xff\xe0 this is not a jpeg"
    return sample


@pytest.mark.parametrize("split_at", [5, 6])
def test_resume_continues_with_exactly_the_next_batches(tmp_path, split_at):
    # 2 shards x 12 pairs, 4 pairs per batch: 6 batches per epoch, so 10 batches cross an epoch
    # boundary; a bad image makes worker cursors differ from batch arithmetic; random flips on.
    write_pair_shards(str(tmp_path), [12, 12], mutate=_corrupt_one)
    pattern = str(tmp_path / "pairs-train-*.tar")
    cfg = dict(num_workers=2, random_flip=True)
    whole = pair_loader(pattern, **cfg)
    full = [batch_digest(b) for b in itertools.islice(whole.endless(), 10)]
    first = pair_loader(pattern, **cfg)
    head = [batch_digest(b) for b in itertools.islice(first.endless(), split_at)]
    state = json.loads(json.dumps(first.state_dict()))
    assert state["epoch"] == (0 if split_at < 6 else 1)
    resumed = pair_loader(pattern, **cfg)
    resumed.load_state_dict(state)
    tail = [batch_digest(b) for b in itertools.islice(resumed.endless(), 10 - split_at)]
    assert head + tail == full
    assert whole.stats()["dropped"]["bad_image"] >= 1
    assert resumed.stats() == whole.stats()  # counters travel with the state


def test_resume_skips_consumed_samples_without_decoding(tmp_path, monkeypatch):
    write_pair_shards(str(tmp_path), [16, 16], no_image_every=1000)
    pattern = str(tmp_path / "pairs-train-*.tar")
    first = pair_loader(pattern, B=4)
    list(itertools.islice(iter(first), 6))
    state = first.state_dict()
    decoded = []
    real = samples.open_image
    monkeypatch.setattr(samples, "open_image", lambda data, max_pixels: decoded.append(1) or real(data, max_pixels))
    resumed = pair_loader(pattern, B=4)
    resumed.load_state_dict(state)
    next(iter(resumed))
    assert len(decoded) == 2 * 4  # only the 4 pairs of the next batch, none of the 24 skipped


def test_random_flip_is_off_by_default_and_seeded_when_on(tmp_path):
    write_pair_shards(str(tmp_path), [8], no_image_every=1000)
    pattern = str(tmp_path / "pairs-train-*.tar")
    plain = next(iter(pair_loader(pattern, B=8, shuffle_buffer=0)))
    flipped = next(iter(pair_loader(pattern, B=8, shuffle_buffer=0, random_flip=True)))
    mirrored = plain["pixel_values"].flip(-1)
    same = [torch.equal(flipped["pixel_values"][r], plain["pixel_values"][r]) for r in range(16)]
    flip = [torch.equal(flipped["pixel_values"][r], mirrored[r]) for r in range(16)]
    assert all(a or b for a, b in zip(same, flip)) and any(flip) and any(same)
    again = next(iter(pair_loader(pattern, B=8, shuffle_buffer=0, random_flip=True)))
    assert torch.equal(again["pixel_values"], flipped["pixel_values"])


def test_resampled_mode_is_endless_and_resumable(tmp_path):
    write_pair_shards(str(tmp_path), [6, 6, 6])
    pattern = str(tmp_path / "pairs-train-*.tar")
    loader = pair_loader(pattern, B=4, resampled=True)
    assert loader.batches_per_epoch == 18 // 4
    full = [batch_digest(b) for b in itertools.islice(pair_loader(pattern, B=4, resampled=True).endless(), 9)]
    assert len(full) == 9
    head = [batch_digest(b) for b in itertools.islice(loader.endless(), 3)]
    resumed = pair_loader(pattern, B=4, resampled=True)
    resumed.load_state_dict(loader.state_dict())
    assert head + [batch_digest(b) for b in itertools.islice(resumed.endless(), 6)] == full


def test_shard_patterns_and_clear_errors(tmp_path):
    paths = write_pair_shards(str(tmp_path), [5, 5, 5])
    assert expand_shards(str(tmp_path / "pairs-train-{000000..000002}.tar")) == paths
    assert expand_shards(str(tmp_path / "pairs-train-*.tar")) == paths
    assert expand_shards([paths[2], paths[0]]) == [paths[0], paths[2]]
    with pytest.raises(FileNotFoundError, match="pairs-val"):
        expand_shards(str(tmp_path / "pairs-val-*.tar"))
    with pytest.raises(FileNotFoundError, match="000009"):
        expand_shards(str(tmp_path / "pairs-train-{000000..000009}.tar"))
    with pytest.raises(ValueError, match="fewer than pairs_per_rank"):
        pair_loader(paths, B=8, world_size=2)
    with open(tmp_path / "manifest.json", "w") as fh:
        fh.write('{"shards": [{"name": "x.tar"}]}')
    with pytest.raises(ValueError, match=r"manifest.json: shards\[0\]"):
        pair_loader(paths, B=2)
    state = pair_loader(paths[:2], B=2, manifest={"shards": []}).state_dict()
    with pytest.raises(ValueError, match="rank 0 on rank 1"):
        pair_loader(paths[:2], B=2, world_size=2, rank=1, manifest={"shards": []}).load_state_dict(
            dict(state, world_size=2))


def test_missing_manifest_counts_from_tar_headers(tmp_path):
    paths = write_pair_shards(str(tmp_path), [5, 7], manifest=False)
    loader = pair_loader(paths, B=3)
    assert loader.counts == {os.path.basename(paths[0]): 5, os.path.basename(paths[1]): 7}
    assert loader.batches_per_epoch == 4 and len(list(loader)) == 4


def test_header_index_matches_tarfile(tmp_path):
    import tarfile

    from notellm2.data_shards.reader import index_shard
    from tests.helpers.data import synthetic_shards
    out, manifest = synthetic_shards(tmp_path / "w", n_pairs=40, shard_size=16)
    paths = write_pair_shards(str(tmp_path / "t"), [5])
    long_path = str(tmp_path / "long.tar")  # a GNU/pax long member name and a directory entry
    with tarfile.open(long_path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name in ["d/" + "x" * 120 + ".q.json", "d/" + "x" * 120 + ".t.json", "y.q.json"]:
            info = tarfile.TarInfo(name)
            info.size = 3
            tf.addfile(info, io.BytesIO(b"abc"))
    prefix_path = str(tmp_path / "prefix.tar")  # ustar: a 100-255 character name split into prefix + name
    with tarfile.open(prefix_path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name in ["p" * 90 + "/" + "k" * 60 + ".q.json", "short.q.json"]:
            info = tarfile.TarInfo(name)
            info.size = 2
            tf.addfile(info, io.BytesIO(b"ab"))
    for path in [os.path.join(out, s["name"]) for s in manifest["shards"]] + paths + [long_path, prefix_path]:
        ix = index_shard(path)
        assert ix.problem is None, (path, ix.problem)
        with tarfile.open(path) as tf:
            want = [(m.name, m.offset_data, m.size) for m in tf if m.isfile()]
        got = [(f"{key}.{ext}", off, size) for key, members in ix.samples for ext, off, size, _ in members]
        assert got == want
    with open(paths[0], "rb") as fh:
        data = fh.read()
    bad = str(tmp_path / "t" / "bad.tar")
    with open(bad, "wb") as fh:
        fh.write(data[:1024] + b"\x01" * 512 + data[1536:])  # the second header
    assert "damaged" in index_shard(bad).problem


class _TextOnlyCollate(CharCollate):
    """Like a text-only prompter: its own has_image says no row feeds image features to the model."""

    def __call__(self, encodings):
        out = super().__call__(encodings)
        out["has_image"] = torch.zeros(len(encodings), dtype=torch.bool)
        return out


class _LyingCollate(CharCollate):
    def __call__(self, encodings):
        out = super().__call__(encodings)
        out["has_image"] = torch.ones(len(encodings), dtype=torch.bool)
        return out


def test_prompters_has_image_wins_and_image_present_stays(tmp_path):
    write_pair_shards(str(tmp_path), [8])
    pattern = str(tmp_path / "pairs-train-*.tar")
    cfg = DataConfig(num_workers=0, shuffle_buffer=0)
    plain = next(iter(pair_loader(pattern, B=8, shuffle_buffer=0)))
    assert torch.equal(plain["has_image"], plain["image_present"])
    text_only = next(iter(PairLoader(pattern, data_cfg=cfg, encode_fn=CharEncoder(), collate_text_fn=_TextOnlyCollate(),
                                     rank=0, world_size=1, pairs_per_rank=8, image_size=32)))
    assert not text_only["has_image"].any()
    assert torch.equal(text_only["image_present"], plain["image_present"]) and not plain["image_present"].all()
    assert torch.equal(text_only["pixel_values"], plain["pixel_values"])
    # query 3 has no image: a collate that claims it uses one is a bug, reported with the note id
    with pytest.raises(ValueError, match="q3"):
        next(iter(PairLoader(pattern, data_cfg=cfg, encode_fn=CharEncoder(), collate_text_fn=_LyingCollate(),
                             rank=0, world_size=1, pairs_per_rank=8, image_size=32)))


class _Count(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield from range(3)


@pytest.mark.parametrize("method,process", [("fork", "ForkProcess"), ("spawn", "SpawnProcess")])
def test_worker_start_method_reaches_the_dataloader(method, process):
    from notellm2.data_shards.reader.workers import start_workers

    it = start_workers(_Count(), 1, method)
    try:
        assert type(it._workers[0]).__name__ == process
        assert sorted(it) == [0, 1, 2]
    finally:
        it._shutdown_workers()
