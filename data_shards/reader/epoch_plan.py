"""The epoch plan: which sample goes into which batch, from the settings and the shard index alone.

* Node split: the shard list is shuffled with (seed, epoch) and dealt round-robin to the ranks.
* A rank's samples, in shard order, go through a shuffle buffer seeded by (seed, epoch, rank): this
  is the rank's sample stream, the same in all its loader workers; worker w takes the batch-sized
  chunks k with k % W == w of it, so without bad samples batch k is chunk k whatever the number of
  workers.
* Equal batches per rank, with no communication: `batches_per_epoch` = min over ranks (pairs in
  that rank's shards per the manifest) // pairs per rank.
* A worker whose chunks run short (dropped samples, truncated shard) refills from its chunks past the
  planned ones and then from further, reshuffled passes over the rank's shards (`candidates`).
* Resampled mode: every (rank, worker) draws shards with replacement.
"""
from __future__ import annotations

import itertools
import os
import random
from dataclasses import dataclass, replace
from typing import Iterable, Iterator, Optional

from notellm2.data_shards.reader.samples import Recorder
from notellm2.data_shards.reader.shard_index import ShardIndex, index_shard


def rng_for(*parts) -> random.Random:
    return random.Random("/".join(str(p) for p in parts))


def _buffer_shuffle(items: Iterable, size: int, rng: random.Random) -> Iterator:
    """Classic shuffle buffer: deterministic for a given rng state."""
    if size <= 1:
        yield from items
        return
    buf = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = item
    rng.shuffle(buf)
    yield from buf


@dataclass(frozen=True)
class EpochPlan:
    """Everything that fixes which sample goes into which batch (besides the data itself)."""
    shards: tuple  # all shard paths (sorted)
    seed: int
    world_size: int
    workers: int  # logical workers per rank (num_workers, at least 1)
    batch: int
    buffer: int
    resampled: bool
    epoch_shards: Optional[tuple] = None  # shards of `override_epoch` (what remained after a world-size change)
    override_epoch: int = -1

    def shards_for_epoch(self, epoch: int) -> list:
        if self.epoch_shards is not None and epoch == self.override_epoch:
            return list(self.epoch_shards)
        return list(self.shards)

    def rank_shards(self, epoch: int, rank: int) -> list:
        order = self.shards_for_epoch(epoch)
        rng_for("shards", self.seed, epoch).shuffle(order)
        return order[rank::self.world_size]

    def batches_per_epoch(self, epoch: int, counts: dict) -> int:
        if self.resampled:
            total = sum(counts[os.path.basename(p)] for p in self.shards)
            return max(1, total // (self.world_size * self.batch))
        per_rank = [sum(counts[os.path.basename(p)] for p in self.rank_shards(epoch, r))
                    for r in range(self.world_size)]
        return min(per_rank) // self.batch

    def candidates(self, epoch: int, rank: int, lw: int, recorder: Optional[Recorder] = None) -> Iterator:
        """Worker `lw`'s endless candidate stream: (pass, shard path, sample)."""
        if self.resampled:
            yield from self._resampled_candidates(epoch, rank, lw, recorder)
            return
        shards = self.rank_shards(epoch, rank)
        for p in itertools.count():
            order = list(shards)
            if p > 0:
                rng_for("refill-shards", self.seed, epoch, rank, p).shuffle(order)
            indexes = [self._index(path, recorder if p == 0 else None) for path in order]
            n_pass = sum(len(ix.samples) for ix in indexes)
            if n_pass == 0:
                raise RuntimeError(f"rank {rank}: no sample can be read from its shards of epoch {epoch}: "
                                   f"{[os.path.basename(s) for s in shards]}")
            # A pass too short to give every worker a chunk is not split (only in refill passes).
            split = p == 0 or n_pass >= self.workers * self.batch
            stream = _buffer_shuffle(((ix.path, s) for ix in indexes for s in ix.samples), self.buffer,
                                     rng_for("samples", self.seed, epoch, rank, p))
            for i, (path, sample) in enumerate(stream):
                if not split or (i // self.batch) % self.workers == lw:
                    yield p, path, sample

    def _resampled_candidates(self, epoch, rank, lw, recorder):
        draw_rng = rng_for("resample", self.seed, epoch, rank, lw)

        def draws():
            for d in itertools.count():
                path = self.shards[draw_rng.randrange(len(self.shards))]
                for s in self._index(path, recorder).samples:
                    yield d, path, s

        yield from _buffer_shuffle(draws(), self.buffer, rng_for("samples", self.seed, epoch, rank, lw))

    @staticmethod
    def _index(path: str, recorder: Optional[Recorder]) -> ShardIndex:
        ix = index_shard(path)
        if ix.problem and recorder is not None:
            recorder.shard_problem(os.path.basename(path), ix.problem)
        return ix


    def with_epoch_shards(self, shards: tuple, epoch: int) -> "EpochPlan":
        """This plan with epoch `epoch` restricted to `shards` (what remained after a world-size change)."""
        return replace(self, epoch_shards=shards, override_epoch=epoch)

    def has_override(self, epoch: int) -> bool:
        return self.epoch_shards is not None and epoch == self.override_epoch
