"""The notes loader: every note of the notes shards exactly once across ranks, in shard order, for
embedding and evaluation (no shuffle, no drop, equal batch counts on every rank)."""
from __future__ import annotations

import json
import logging
import os
from typing import Callable, Iterator, Optional

import torch
from torch.utils.data import IterableDataset, get_worker_info

from notellm2.data_shards.batch import NoteBatch
from notellm2.data_shards.reader.collate import NoteItem, collate_notes, note_text_dict
from notellm2.data_shards.config import DataConfig
from notellm2.data_shards.reader.pixel_slots import PixelSlots, collate_into_slot
from notellm2.data_shards.reader.samples import BadSample, BadSampleLog, ItemLoader, Recorder, new_stats, read_note
from notellm2.data_shards.reader.shard_index import Sample, ShardFiles, expand_shards, index_shard
from notellm2.data_shards.vision_cache import cache_for_loader
from notellm2.data_shards.reader.workers import consume

log = logging.getLogger("notellm2.data_shards.reader")


class _NotesSource:
    """What a worker needs to turn notes-shard samples into NoteItems (picklable). A bad image is
    always blanked: embedding drops no note."""

    def __init__(self, data_cfg: DataConfig, encode_fn, collate_text_fn, image_size: int, cache=None):
        self.items = ItemLoader(encode_fn, collate_text_fn, image_size, data_cfg.max_image_pixels,
                                blank_bad_images=True, cache=cache)

    def dummy(self) -> NoteItem:
        note = {"note_id": "", "title": "", "content": "", "topics": []}
        return NoteItem("", self.items.encode_fn(note_text_dict(note, False)), None, is_dummy=True)

    def load_note(self, files: ShardFiles, path: str, sample: Sample, recorder: Recorder, where: str) -> NoteItem:
        try:
            note = read_note(files, path, sample)
            return self.items.load(files, path, sample, note, "", False, recorder, where)
        except BadSample as e:
            recorder.bad(where, e.reason, str(e), "unusable")
            return self.dummy()


class _NotesStream(IterableDataset):
    def __init__(self, source: _NotesSource, items: list, rank: int, world_size: int, batch: int, n_batches: int,
                 workers: int, slots: Optional[PixelSlots] = None, first: int = 0):
        self.source, self.items, self.rank, self.world_size = source, items, rank, world_size
        self.batch, self.n_batches, self.workers, self.slots = batch, n_batches, workers, slots
        self.first = first  # batches before this one are not read (NotesLoader's skip_batches)

    def __iter__(self):
        info = get_worker_info()
        if info is not None:
            owned = range(self.first + info.id, self.n_batches, info.num_workers)
        else:
            owned = range(self.first, self.n_batches)
        recorder, files = Recorder(), ShardFiles()
        try:
            for k in owned:
                start = (k * self.world_size + self.rank) * self.batch
                notes = []
                for g in range(start, start + self.batch):
                    if g < len(self.items):
                        path, sample = self.items[g]
                        notes.append(self.source.load_note(files, path, sample, recorder,
                                                           f"{os.path.basename(path)}/{sample[0]}"))
                    else:
                        notes.append(self.source.dummy())
                meta = {"k": k}
                batch = collate_into_slot(collate_notes, notes, self.source.items, self.slots,
                                          info.id if info is not None else 0, meta)
                batch["is_dummy"] = torch.tensor([n.is_dummy for n in notes], dtype=torch.bool)
                meta.update(recorder.drain())
                batch["_meta"] = meta
                yield batch
        finally:
            files.close()


class NotesLoader:
    """Every note of the notes shards exactly once across ranks, in shard order, no shuffle, no drop.

    Rank r's batch k holds the notes at global positions (k * world_size + r) * B ... + B - 1; every
    rank yields `len(loader)` batches of exactly B rows, padding rows (and notes that cannot be read
    at all) have `is_dummy` True and `note_ids` -1. A note whose image is bad keeps a blank image.
    Each batch is a `NoteBatch` (data_shards/batch.py; uint8 pixels, normalised by its `to_device()`,
    or with data.vision_cache the cached tower features).

    `bad_sample_log`: a file that gets one JSON line per bad note and damaged shard (BadSampleLog).
    `skip_batches=n`: this rank's first n batches are not read at all (no sample of theirs is decoded);
    the loader yields batches n .. total_batches - 1, each composed exactly as without the skip, and
    `len()` is the number it yields. `notellm2 embed` resumes from its finished parts with it.
    """

    def __init__(self, shards, data_cfg: DataConfig, encode_fn: Callable[[dict], dict],
                 collate_text_fn: Callable[[list], dict], rank: int, world_size: int, batch_size: int,
                 image_size: int = 224, max_notes: Optional[int] = None, skip_batches: int = 0,
                 bad_sample_log: Optional[str] = None):
        if not (0 <= rank < world_size):
            raise ValueError(f"NotesLoader: rank {rank} is not in [0, world_size={world_size})")
        if batch_size <= 0:
            raise ValueError(f"NotesLoader: batch_size must be > 0, got {batch_size}")
        self.paths = expand_shards(shards)
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.num_workers = data_cfg.num_workers
        self.data_cfg = data_cfg
        # data.vision_cache: features instead of pixels, checked here against the shards and settings
        self.vision_cache = cache_for_loader(data_cfg, self.paths, image_size, False, "NotesLoader")
        self._source = _NotesSource(data_cfg, encode_fn, collate_text_fn, image_size, self.vision_cache)
        self._items = []
        self._stats = new_stats()
        self._log_bad = BadSampleLog("bad note %s: %s [%s]; %s", {"blanked": "embedded with a blank image",
                                                                  "unusable": "left out (is_dummy row)"},
                                     path=bad_sample_log)
        self.pixel_transport = {"slots": 0, "ordinary": 0}
        for path in self.paths:
            ix = index_shard(path)
            if ix.problem:
                self._stats["shard_problems"] += 1
                log.warning("shard %s: %s", os.path.basename(path), ix.problem)
                if skip_batches == 0:  # a resumed run logged it the first time
                    self._log_bad.write(os.path.basename(path), "shard", ix.problem, "shard")
            self._items.extend((path, s) for s in ix.samples)
        if max_notes is not None:  # the first max_notes notes in shard order (a slice for evaluation)
            self._items = self._items[:max_notes]
        per_step = world_size * batch_size
        self._n_batches = (len(self._items) + per_step - 1) // per_step
        if not 0 <= skip_batches <= self._n_batches:
            raise ValueError(f"NotesLoader: skip_batches {skip_batches} is not in [0, {self._n_batches}] "
                             f"(this rank's batches)")
        self.skip_batches = skip_batches

    @property
    def num_notes(self) -> int:
        return len(self._items)

    def __len__(self) -> int:
        return self._n_batches - self.skip_batches

    @property
    def total_batches(self) -> int:
        """This rank's batches without the skip (the same on every rank)."""
        return self._n_batches

    def stats(self) -> dict:
        return json.loads(json.dumps(self._stats))

    def __iter__(self) -> Iterator[NoteBatch]:
        slots = None
        if self.num_workers > 0 and self.data_cfg.pixel_slots and self.vision_cache is None:
            slots = PixelSlots.create(self.num_workers, self.batch_size, self._source.items.image_size)
        stream = _NotesStream(self._source, self._items, self.rank, self.world_size, self.batch_size,
                              self._n_batches, max(1, self.num_workers), slots, first=self.skip_batches)
        for batch, _ in consume(stream, self.num_workers, self.data_cfg.worker_start_method, slots,
                                self.pixel_transport, NoteBatch, self.skip_batches, self._stats, self._log_bad, "NotesLoader"):
            self._stats["batches"] += 1
            yield batch
