"""`notellm2 data cache-vision`: run the frozen vision tower once over every note with an image and
store its outputs (format and read side: data_shards/vision_cache.py); and the run's start-up check
of a configured cache (`check_run_cache`).

    summary = build_vision_cache(cfg, out_dir)                       # the config's shard sets, its tower
    summary = build_vision_cache(cfg, out_dir, shards=["d/notes-*.tar", "d/pairs-*.tar"], flip=True)
    cache = check_run_cache(cfg, tower)                              # the trainer, before its first step

The cache must hold every note any shard set of the run serves with an image: pair shards hold their
notes inline (q.json + q.jpg, t.json + t.jpg), notes shards one note per sample (json + jpg), and the
same note appears in many samples; each distinct note id is decoded and run through the tower once.
The pixels take the loaders' own path (`decode_image`: EXIF orientation, the pixel limit, shorter side
to the tower's size, centre crop; `normalize_pixels`) and the tower is called through
`notellm2.modeling.vision.encode_images`, so a cached row is what the live path computes for that image.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from notellm2.data_shards.reader.shard_index import ShardFiles, expand_shards, index_shard
from notellm2.outputs import check_folder_output
from notellm2.data_shards.vision_cache import (CacheWriter, VisionCacheError, cache_bytes, manifest_entries, open_cache)
from notellm2.launcher.config import ConfigError, RunConfig

log = logging.getLogger(__name__)


def cache_shard_sets(cfg: RunConfig) -> list[tuple[str, str]]:
    """(setting, pattern) of every shard set the config names: what a cache for it must cover."""
    sets = [("data.train_shards", cfg.data.train_shards), ("data.val_shards", cfg.data.val_shards),
            ("data.notes_shards", cfg.data.notes_shards), ("eval.notes_shards", cfg.eval.notes_shards)]
    return [(k, v) for k, v in sets if v]


def training_shard_sets(cfg: RunConfig) -> list[tuple[str, str]]:
    """The shard sets `notellm2 train` reads: train, val (validation loss), eval.notes_shards (retrieval)."""
    sets = [("data.train_shards", cfg.data.train_shards), ("data.val_shards", cfg.data.val_shards)]
    if cfg.eval.every_steps:
        sets.append(("eval.notes_shards", cfg.eval.notes_shards))
    return [(k, v) for k, v in sets if v]


def check_run_cache(cfg: RunConfig, tower, shard_sets: Optional[list] = None):
    """The run's vision cache, checked before anything trains (None when data.vision_cache is unset):
    built by this tower (key), covering every shard set the run reads, with the flipped orientation
    when data.random_flip is on. Each failure is one line naming the cache and what to do."""
    path = cfg.data.vision_cache
    if not path:
        return None
    if tower is None:
        raise ConfigError(f"data.vision_cache: set ({path!r}), but model.variant {cfg.model.variant!r} uses no image; "
                          "unset it")
    from notellm2.modeling.vision import tower_key

    cache = open_cache(path)
    live = tower_key(tower)
    if cache.key != live:
        raise ConfigError(f"data.vision_cache: {path!r} holds features of a tower with key {cache.key[:16]}, but the "
                          f"live tower (model.vision) has key {live[:16]}: other settings or weights; write the cache "
                          "again with `notellm2 data cache-vision` for this tower")
    for setting, pattern in shard_sets if shard_sets is not None else training_shard_sets(cfg):
        flip = setting == "data.train_shards" and cfg.data.random_flip
        cache.check_loader(expand_shards(pattern), cfg.model.vision.image_size, flip, cfg.data.max_image_pixels,
                           f"data.vision_cache ({setting})")
    return cache


# ----------------------------------------------------------------------------- building

@dataclass
class _NoteImage:
    note_id: str
    path: str
    sample: tuple
    member: str
    digest: Optional[str]           # sha256 of the image member's bytes (None: the member cannot be read)
    bad: Optional[tuple] = None     # (reason, message) when the member cannot be read


def _note_members(exts: set) -> list[tuple[str, str]]:
    """(json member, image prefix) of the notes a sample holds: a pair's two, or a notes sample's one."""
    if "q.json" in exts or "t.json" in exts:
        return [(m, m[:2]) for m in ("q.json", "t.json") if m in exts]
    return [("json", "")] if "json" in exts else []


def find_note_images(paths: list[str], progress: bool = True) -> tuple[list[_NoteImage], dict]:
    """Every distinct note id with an image member in the shards `paths`, in first-seen order, and the
    samples per shard. A note whose image bytes differ between two samples cannot be keyed by its id:
    refused."""
    from tqdm import tqdm

    from notellm2.data_shards.reader.samples import BadSample, image_member, parse_note, read_members

    notes: dict[str, _NoteImage] = {}
    samples: dict[str, int] = {}
    files = ShardFiles()
    try:
        for path in tqdm(paths, desc="cache-vision: index", unit="shard", disable=not progress):
            ix = index_shard(path)
            if ix.problem:
                log.warning("shard %s: %s (its readable samples are used)", os.path.basename(path), ix.problem)
            samples[os.path.basename(path)] = len(ix.samples)
            for sample in ix.samples:
                exts = {m[0] for m in sample[1]}
                for json_member, prefix in _note_members(exts):
                    img = image_member(sample, prefix)
                    if img is None:
                        continue
                    try:
                        note = parse_note(read_members(files, path, sample, [json_member])[json_member], json_member)
                    except BadSample:
                        continue  # the loaders drop (or pad) this note: nothing to cache
                    nid = note["note_id"]
                    digest, bad = None, None
                    try:
                        digest = hashlib.sha256(read_members(files, path, sample, [img])[img]).hexdigest()
                    except BadSample as e:
                        bad = (e.reason, str(e))
                    seen = notes.get(nid)
                    if seen is None:
                        notes[nid] = _NoteImage(nid, path, sample, img, digest, bad)
                    elif seen.digest != digest:
                        raise VisionCacheError(
                            f"note {nid!r} has different image bytes in {os.path.basename(seen.path)}/{seen.sample[0]} "
                            f"and {os.path.basename(path)}/{sample[0]}: a cache keyed by note id cannot hold both; "
                            "write the shards again from one catalog (`notellm2 data write-shards`)")
    finally:
        files.close()
    return list(notes.values()), samples


class _Decoded(torch.utils.data.Dataset):
    """Note i -> (i, uint8 [S, S, 3] or None, (reason, message) or None), on the loaders' decode path."""

    def __init__(self, notes: list[_NoteImage], image_size: int, max_pixels: int):
        self.notes, self.image_size, self.max_pixels = notes, image_size, max_pixels
        self._files = None

    def __len__(self) -> int:
        return len(self.notes)

    def __getitem__(self, i: int):
        from notellm2.data_shards.reader.samples import BadSample, decode_image, read_members

        n = self.notes[i]
        if n.bad is not None:
            return i, None, n.bad
        if self._files is None:
            self._files = ShardFiles()
        try:
            raw = read_members(self._files, n.path, n.sample, [n.member])[n.member]
            img = decode_image(raw, n.member, self.max_pixels, self.image_size, flip=False)
        except BadSample as e:
            return i, None, (e.reason, str(e))
        return i, np.asarray(img, dtype=np.uint8), None


def _keep_list(items):
    return items


def build_vision_cache(cfg: RunConfig, out_dir: Optional[str] = None, shards: Optional[list[str]] = None,
                       flip: bool = False, dtype: str = "float32", batch_size: int = 32,
                       num_workers: Optional[int] = None, overwrite: bool = False, progress: bool = True,
                       device: Optional[str] = None, tower=None) -> dict:
    """Write the vision cache of the tower `cfg.model.vision` (or `tower`) for the notes of `shards`
    (default: every shard set of the config) to `out_dir` (default: data.vision_cache). Returns what
    was written (the cache.json fields plus counts and timings)."""
    from tqdm import tqdm

    from notellm2.data_shards.batch import normalize_pixels
    from notellm2.modeling.vision import build_vision_tower, encode_images, tower_key

    out_dir = out_dir or cfg.data.vision_cache
    if not out_dir:
        raise ConfigError("cache-vision: no output folder (--out, or data.vision_cache in the config)")
    patterns = list(shards) if shards else [p for _, p in cache_shard_sets(cfg)]
    if not patterns:
        raise ConfigError("cache-vision: no shards (--shards, or data.train_shards / data.val_shards / "
                          "data.notes_shards / eval.notes_shards in the config)")
    paths: list[str] = []
    for pattern in patterns:
        for p in expand_shards(pattern):
            if p not in paths:
                paths.append(p)
    names = [os.path.basename(p) for p in paths]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise VisionCacheError(f"cache-vision: the shard name {dup[0]!r} is in several folders; the cache names the "
                               "shards it covers by file name")
    check_folder_output(out_dir)
    if os.path.exists(out_dir) and not overwrite:  # before the tower loads (CacheWriter checks it again)
        raise VisionCacheError(f"--out: {out_dir!r} exists; pass --overwrite to replace it")
    t0 = time.perf_counter()
    notes, samples = find_note_images(paths, progress)
    if not notes:
        raise VisionCacheError(f"cache-vision: no note of {len(paths)} shard(s) has an image member "
                               f"(first: {paths[0]}); there is nothing to cache")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if tower is None:
        tower = build_vision_tower(cfg.model.vision)
    tower.to(dev).eval()
    key = tower_key(tower)
    size = cfg.model.vision.image_size
    orientations = ["plain", "flipped"] if flip else ["plain"]
    blank = {"pixel_values": torch.zeros(1, 3, size, size, device=dev)}  # a row without an image, after to_device
    b_tokens, b_pooled = encode_images(tower, blank)
    dims = (int(b_tokens.shape[1]), int(b_tokens.shape[2]), int(b_pooled.shape[1]))
    writer = CacheWriter(out_dir, len(notes), orientations, *dims, dtype=dtype, overwrite=overwrite)
    np_dtype = writer.tokens.dtype
    bad: dict[str, tuple] = {}
    t_tower = 0.0
    try:
        for o in range(len(orientations)):
            writer.put(o, [len(notes)], b_tokens.float().cpu().numpy().astype(np_dtype),
                       b_pooled.float().cpu().numpy().astype(np_dtype))
        workers = cfg.data.num_workers if num_workers is None else num_workers
        decoded = _Decoded(notes, size, cfg.data.max_image_pixels)
        loader = torch.utils.data.DataLoader(decoded, batch_size=batch_size, num_workers=workers, collate_fn=_keep_list)
        for items in tqdm(loader, desc="cache-vision: tower", unit="batch", disable=not progress):
            good = [(i, arr) for i, arr, why in items if why is None]
            for i, _, why in items:
                if why is not None:
                    bad[notes[i].note_id] = why
            writer.skip([i for i, _, why in items if why is not None])
            if not good:
                continue
            rows = [i for i, _ in good]
            hwc = torch.from_numpy(np.stack([arr for _, arr in good]))
            for o, name in enumerate(orientations):
                pix = hwc if name == "plain" else hwc.flip(2)  # the width axis: PIL's FLIP_LEFT_RIGHT
                pix = pix.permute(0, 3, 1, 2).to(dev)  # what the loaders hand to_device: a channels-last uint8 view
                every = torch.ones(len(rows), dtype=torch.bool, device=dev)
                t1 = time.perf_counter()
                tokens, pooled = encode_images(tower, {"pixel_values": normalize_pixels(pix, every)})
                tokens, pooled = tokens.float().cpu().numpy(), pooled.float().cpu().numpy()
                t_tower += time.perf_counter() - t1
                writer.put(o, rows, tokens.astype(np_dtype, copy=False), pooled.astype(np_dtype, copy=False))
        if decoded._files is not None:  # decoded in this process (num_workers 0)
            decoded._files.close()
        entries = manifest_entries(paths)
        for name, entry in entries.items():
            entry["samples"] = samples.get(name, 0)
        vcfg = cfg.model.vision
        meta = {"tower_key": key, "image_size": size, "max_image_pixels": cfg.data.max_image_pixels,
                "tower": {"kind": vcfg.kind, "path": vcfg.path, "factory": vcfg.factory, "hidden_layer": vcfg.hidden_layer,
                          "tokens": vcfg.tokens, "cls_source": vcfg.cls_source, "image_size": vcfg.image_size},
                "shards": entries, "notes_with_features": len(notes) - len(bad),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        path = writer.commit([n.note_id for n in notes], bad, meta)
    except BaseException:
        writer.abort()
        raise
    nbytes = cache_bytes(len(notes), len(orientations), *dims, np.dtype(np_dtype).itemsize)
    return {**meta, "path": path, "num_notes": len(notes), "bad_images": len(bad), "orientations": orientations,
            "dtype": dtype, "num_tokens": dims[0], "token_dim": dims[1], "pooled_dim": dims[2], "bytes": nbytes,
            "seconds": time.perf_counter() - t0, "tower_seconds": t_tower, "device": str(dev)}
