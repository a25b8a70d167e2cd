"""The loader workers: starting them, and the one consume loop through which both loaders take
their batches (pixels out of their slot, batch order checked, counters merged, problems logged)."""
from __future__ import annotations

import faulthandler
import gc
import signal
import sys
from typing import Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset

from notellm2.data_shards.batch import Batch
from notellm2.data_shards.reader.pixel_slots import PREFETCH, PixelSlots, pixels_from_slot
from notellm2.data_shards.reader.samples import NoUsableData, merge_counts
from notellm2.data_shards.reader.shard_index import _gc_freeze_if_none_frozen


# A worker prints every thread's Python stack to its stderr (the rank's log) on this signal: a stalled
# rank's watchdog sends it to its forked loader workers before ending the rank (launcher/distributed.py),
# so that a batch that never comes shows where its worker waits.
STACKS_SIGNAL = signal.SIGUSR2


def _worker_init(_):
    torch.set_num_threads(1)
    stream = sys.__stderr__
    if stream is not None:
        try:
            faulthandler.register(STACKS_SIGNAL, file=stream, all_threads=True)
        except (AttributeError, OSError, ValueError, RuntimeError):  # no such signal, or stderr has no fd
            pass


def start_workers(stream: IterableDataset, num_workers: int, start_method: str = "fork"):
    # Freeze the objects that exist now while the workers fork: they are left out of the workers'
    # garbage collections. Otherwise a worker's first collection walks the whole inherited heap (torch
    # imported) and copies every page it touches: measured 0.16 s and 11,600 page copies before each
    # worker could start, against 0.025 s and 1,900 frozen (see the gc.freeze docs on fork).
    frozen = _gc_freeze_if_none_frozen()
    try:
        return iter(DataLoader(stream, batch_size=None, num_workers=num_workers, worker_init_fn=_worker_init,
                               prefetch_factor=PREFETCH, multiprocessing_context=start_method))
    finally:
        if frozen:
            gc.unfreeze()


def consume(stream: IterableDataset, num_workers: int, start_method: str, slots: Optional[PixelSlots],
            transport: dict, kind: type, first: int, stats: dict, on_event: Callable, who: str) -> Iterator[tuple]:
    """(batch, meta) for each batch of `stream` (in this process, or from `num_workers` workers).

    Each batch gets its pixels back from its slot (`transport` counts which way they came), must be
    batch number `first`, `first + 1`, ... (the DataLoader hands worker results round-robin; anything
    else fails loudly), becomes a checked `kind` (PairBatch, NoteBatch); its worker's counters are
    merged into `stats` and each of its events goes to `on_event(where, reason, message, action)`.
    A worker's `fatal` message (its samples stopped being usable) ends the stream with `NoUsableData`,
    after its records went the same way."""
    it = start_workers(stream, num_workers, start_method) if num_workers > 0 else iter(stream)
    expected = first
    for raw in it:
        meta = raw.pop("_meta")
        if "fatal" in meta:  # a worker whose samples stopped being usable: its records first, then one line
            merge_counts(stats, meta["counts"])
            for event in meta["events"]:
                on_event(*event)
            raise NoUsableData(meta["fatal"])
        pixels_from_slot(raw, meta, slots, transport)
        if meta["k"] != expected:
            raise RuntimeError(f"{who}: got batch {meta['k']} where batch {expected} was due")
        expected += 1
        batch: Batch = kind(raw).check(who)
        merge_counts(stats, meta["counts"])
        for event in meta["events"]:
            on_event(*event)
        yield batch, meta
