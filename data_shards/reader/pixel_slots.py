"""Pixel slots: reused shared-memory buffers that carry the loader workers' uint8 pixels to the rank."""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from notellm2.data_shards.reader.collate import pixel_buffer

log = logging.getLogger("notellm2.data_shards.reader")

PREFETCH = 2  # the DataLoader's prefetch_factor: batches requested ahead from each worker
SLOTS_PER_WORKER = PREFETCH + 1  # see PixelSlots


class PixelSlots:
    """Reused shared-memory buffers that carry the workers' uint8 pixels to the rank process.

    A DataLoader worker normally puts every batch tensor into fresh shared memory, and for the
    pixels (4.8 MB for 16 pairs at 224 px) the page faults of that fresh memory cost about a tenth
    of the batch's decoding time on a small machine. Instead, worker j owns slots `[j, 0..S-1]`
    allocated once per epoch by the rank before the workers start: it claims a free slot (flag
    0 -> 1), collates its batch's pixels straight into it and sends the slot number. The rank copies
    the rows out the moment the batch arrives and frees the slot (flag -> 0). With S = PREFETCH + 1 a
    worker normally always finds a free slot (it is at most PREFETCH batches ahead, plus the one being
    copied); when it does not (the DataLoader sends more requests to the last busy worker at the end
    of an epoch), that batch's pixels travel the ordinary way. A worker never waits and never writes
    into a slot the rank has not emptied.
    """

    def __init__(self, workers: int, rows: int, image_size: int, slots: int):
        self.pixels = pixel_buffer(workers * slots * rows, image_size).view(
            workers, slots, rows, image_size, image_size, 3).share_memory_()
        self.busy = torch.zeros(workers, slots, dtype=torch.uint8).share_memory_()

    @classmethod
    def create(cls, workers: int, rows: int, image_size: int, shm_dir: str = "/dev/shm") -> Optional["PixelSlots"]:
        """The slots, or None (pixels then travel the ordinary way) when `shm_dir` has not the room
        for them with a margin or shared memory cannot be had; logged once per process."""
        need = workers * SLOTS_PER_WORKER * rows * image_size * image_size * 3
        try:
            st = os.statvfs(shm_dir)
            free = st.f_bavail * st.f_frsize
        except OSError:
            free = None  # no such folder (not Linux): let torch say whether it can share memory
        if free is not None and free < 2 * need:
            _log_once(f"{shm_dir} has {free / 2**20:.1f} MiB free, under twice the {need / 2**20:.1f} MiB of "
                      f"pixel slots: batches move through fresh shared memory instead (slower); give the "
                      f"container more shared memory (docker --shm-size) to restore them")
            return None
        try:
            return cls(workers, rows, image_size, SLOTS_PER_WORKER)
        except RuntimeError as e:
            _log_once(f"cannot allocate {need / 2**20:.1f} MiB of shared pixel slots ({e}): batches move through "
                      f"fresh shared memory instead (slower)")
            return None

    def claim(self, worker: int) -> Optional[tuple]:
        """(slot, uint8 [rows, S, S, 3] buffer) for worker `worker`, or None when all its slots are taken."""
        for s in range(self.busy.shape[1]):
            if not self.busy[worker, s]:
                self.busy[worker, s] = 1
                return s, self.pixels[worker, s]
        return None

    def take(self, worker: int, slot: int, n: int) -> torch.Tensor:
        """A copy of the first n rows of a filled slot as a channels-last view [n,3,S,S]; frees the slot."""
        if not self.busy[worker, slot]:
            raise RuntimeError(f"pixel slot ({worker}, {slot}) arrived empty: the loader's slot protocol is broken")
        out = self.pixels[worker, slot, :n].clone()
        self.busy[worker, slot] = 0
        return out.permute(0, 3, 1, 2)


_LOGGED_ONCE: set = set()


def _log_once(message: str) -> None:
    if message not in _LOGGED_ONCE:
        _LOGGED_ONCE.add(message)
        log.warning(message)


def collate_into_slot(collate, items, item_loader, slots: Optional[PixelSlots], worker: int, meta: dict) -> dict:
    """Collate a batch, its pixels into a free slot of `worker` when there is one (see PixelSlots); with a
    vision cache (`item_loader.cache`) the batch carries its features and no pixels (the loaders make
    no slots then)."""
    claim = slots.claim(worker) if slots is not None else None
    batch = collate(items, item_loader.collate_text_fn, item_loader.image_size, out=None if claim is None else claim[1],
                    cache=item_loader.cache)
    if claim is not None:
        del batch["pixel_values"]
        meta.update(worker=worker, slot=claim[0])
    return batch


def pixels_from_slot(batch: dict, meta: dict, slots: Optional[PixelSlots], transport: dict) -> None:
    slot = meta.get("slot")
    if slot is None:
        transport["ordinary"] += 1
        return
    batch["pixel_values"] = slots.take(meta["worker"], slot, len(batch["note_id_strs"]))
    transport["slots"] += 1

