"""Streaming readers over WebDataset tar shards: pair batches for training, notes for embedding.

The public surface; each stage lives in a file named for its job (details in docs/reader.md):

    data_shards/reader/shard_index.py   shard lists, manifest counts, header-only tar index, member reads
    data_shards/reader/samples.py       sample parsing and checks, the one note -> NoteItem path, bad-sample records
    data_shards/reader/epoch_plan.py    EpochPlan: which sample goes into which batch (node/worker split, refill)
    data_shards/reader/pixel_slots.py   reused shared-memory slots that carry uint8 pixels from the workers
    data_shards/reader/workers.py       starting the loader workers; the one consume loop of both loaders
    data_shards/reader/pair_loader.py   PairLoader: training pairs, resumable to the batch
    data_shards/reader/notes_loader.py  NotesLoader: every note once across ranks
    data_shards/batch.py         the batch contract (PairBatch, NoteBatch) and to_device()
"""
from __future__ import annotations

import importlib

# name -> module: imported on first use (PEP 562), so that importing one stage (say `collate`, which
# the serving encoder uses) does not import the loaders and webdataset.
_PUBLIC = {
    "BatchError": "notellm2.data_shards.batch", "NoteBatch": "notellm2.data_shards.batch",
    "PairBatch": "notellm2.data_shards.batch", "normalize_pixels": "notellm2.data_shards.batch",
    "to_device": "notellm2.data_shards.batch",
    "EpochPlan": "notellm2.data_shards.reader.epoch_plan",
    "NotesLoader": "notellm2.data_shards.reader.notes_loader",
    "STATE_VERSION": "notellm2.data_shards.reader.pair_loader", "PairLoader": "notellm2.data_shards.reader.pair_loader",
    "ShardSetError": "notellm2.data_shards.reader.pair_loader", "NoUsableData": "notellm2.data_shards.reader.samples",
    "PREFETCH": "notellm2.data_shards.reader.pixel_slots", "SLOTS_PER_WORKER": "notellm2.data_shards.reader.pixel_slots",
    "IMAGE_REASONS": "notellm2.data_shards.reader.samples",
    "ShardIndex": "notellm2.data_shards.reader.shard_index", "expand_shards": "notellm2.data_shards.reader.shard_index",
    "index_shard": "notellm2.data_shards.reader.shard_index",
    "load_manifest_counts": "notellm2.data_shards.reader.shard_index",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
