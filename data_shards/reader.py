"""Streaming readers over WebDataset tar shards: pair batches for training, notes for embedding.

The public surface; each stage lives in a file named for its job (details in docs/reader.md):

    data_shards/shard_index.py   shard lists, manifest counts, header-only tar index, member reads
    data_shards/samples.py       sample parsing and checks, the one note -> NoteItem path, bad-sample records
    data_shards/epoch_plan.py    EpochPlan: which sample goes into which batch (node/worker split, refill)
    data_shards/pixel_slots.py   reused shared-memory slots that carry uint8 pixels from the workers
    data_shards/workers.py       starting the loader workers; the one consume loop of both loaders
    data_shards/pair_loader.py   PairLoader: training pairs, resumable to the batch
    data_shards/notes_loader.py  NotesLoader: every note once across ranks
    data_shards/batch.py         the batch contract (PairBatch, NoteBatch) and to_device()
"""
from __future__ import annotations

from data_shards.batch import BatchError, NoteBatch, PairBatch, normalize_pixels, to_device
from data_shards.epoch_plan import EpochPlan
from data_shards.notes_loader import NotesLoader
from data_shards.pair_loader import STATE_VERSION, PairLoader
from data_shards.pixel_slots import PREFETCH, SLOTS_PER_WORKER
from data_shards.samples import IMAGE_REASONS
from data_shards.shard_index import ShardIndex, expand_shards, index_shard, load_manifest_counts

__all__ = ["PairLoader", "NotesLoader", "PairBatch", "NoteBatch", "BatchError", "to_device", "normalize_pixels",
           "EpochPlan", "ShardIndex", "expand_shards", "index_shard", "load_manifest_counts", "STATE_VERSION",
           "IMAGE_REASONS", "PREFETCH", "SLOTS_PER_WORKER"]
