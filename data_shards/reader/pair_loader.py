"""The pair loader: pair batches for training, shuffled by the epoch plan, exactly
`batches_per_epoch` batches on every rank, resumable to the batch (docs/reader.md).

The position is (epoch, batches done, per-worker cursor = candidates consumed). Every batch carries
its worker's cursor, so `state_dict()` reflects exactly what the consumer has received, not what the
workers prefetched.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import random
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Union

from torch.utils.data import IterableDataset, get_worker_info

from notellm2.data_shards.batch import PairBatch
from notellm2.data_shards.reader.collate import NoteItem, collate_pairs
from notellm2.data_shards.config import DataConfig
from notellm2.data_shards.reader.epoch_plan import EpochPlan, rng_for
from notellm2.data_shards.reader.pixel_slots import PixelSlots, collate_into_slot
from notellm2.data_shards.reader.samples import (BadSample, BadSampleLog, ItemLoader, NoUsableData, Recorder,
                                                 counts_line, merge_counts, new_stats, read_pair_notes)
from notellm2.errors import UserError
from notellm2.data_shards.reader.shard_index import Sample, ShardFiles, expand_shards, index_shard, load_manifest_counts
from notellm2.data_shards.vision_cache import cache_for_loader
from notellm2.data_shards.reader.workers import consume

log = logging.getLogger("notellm2.data_shards.reader")

STATE_VERSION = 1


class ShardSetError(UserError, ValueError):
    """Shards that cannot give the batches asked for (too few pairs for the batch on some rank)."""


class _NoUsablePairs(RuntimeError):
    """Raised in a worker when its candidates stopped giving usable pairs; sent to the rank's main
    process as a batch-less message (with the worker's bad-sample records), never as a traceback."""


class _PairSource:
    """What a worker needs to turn candidates into pairs (picklable)."""

    def __init__(self, data_cfg: DataConfig, encode_fn, collate_text_fn, image_size: int, cache=None):
        self.random_flip = data_cfg.random_flip
        self.items = ItemLoader(encode_fn, collate_text_fn, image_size, data_cfg.max_image_pixels,
                                blank_bad_images=data_cfg.bad_sample_policy == "blank_image", cache=cache)

    def load_pair(self, files: ShardFiles, path: str, sample: Sample, flip_rng: random.Random,
                  recorder: Recorder, where: str) -> Optional[tuple[NoteItem, NoteItem]]:
        """(query NoteItem, target NoteItem), or None when the pair is dropped."""
        try:
            q_note, t_note = read_pair_notes(files, path, sample)
            flips = (self.random_flip and flip_rng.random() < 0.5, self.random_flip and flip_rng.random() < 0.5)
            return (self.items.load(files, path, sample, q_note, "q.", flips[0], recorder, where),
                    self.items.load(files, path, sample, t_note, "t.", flips[1], recorder, where))
        except BadSample as e:
            recorder.bad(where, e.reason, str(e), "dropped")
            return None


@dataclass
class _WorkerCursor:
    """One logical worker's place in its endless candidate stream (EpochPlan.candidates), with the
    counts that tell a stream that no longer gives usable pairs."""
    candidates: Iterator
    consumed: int = 0        # candidates taken from the stream (what the state saves)
    pass_no: int = -1        # the pass of the last candidate: 0 = planned, 1, 2, ... = refill passes
    usable_in_pass: int = 0  # usable pairs in the current pass (not resampled)
    unusable_run: int = 0    # resampled: candidates since the last usable one

    @classmethod
    def at(cls, candidates: Iterator, consumed: int) -> "_WorkerCursor":
        """A cursor that has skipped `consumed` candidates: index arithmetic only, nothing read or decoded."""
        for _ in range(consumed):
            next(candidates)
        return cls(candidates, consumed)

    def take(self, resampled: bool, rank: int, epoch: int) -> tuple:
        """The next candidate (pass, shard path, sample); raises when a whole refill pass gave no usable pair."""
        p, path, sample = next(self.candidates)
        if resampled:
            self.unusable_run += 1
        elif p != self.pass_no:
            if self.pass_no >= 1 and self.usable_in_pass == 0:
                raise _NoUsablePairs(f"rank {rank}: a whole refill pass over its shards gave no usable pair "
                                     f"(epoch {epoch})")
            self.pass_no, self.usable_in_pass = p, 0
        self.consumed += 1
        return p, path, sample

    def usable(self, resampled: bool) -> None:
        """The last candidate gave a pair."""
        if resampled:
            self.unusable_run = 0
        else:
            self.usable_in_pass += 1

    def check_resampled(self, rank: int, batch: int) -> None:
        """Resampled streams have no passes: give up after far more unusable candidates in a row than a batch."""
        if self.unusable_run > 10_000 + 10 * batch:
            raise _NoUsablePairs(f"rank {rank}: {self.unusable_run} resampled candidates in a row were unusable")


class _PairEpochStream(IterableDataset):
    """Yields this rank's batches [start, end) of one epoch; each worker the ones it owns."""

    def __init__(self, source: _PairSource, plan: EpochPlan, epoch: int, rank: int, start: int, end: int,
                 cursors: dict, slots: Optional[PixelSlots] = None):
        self.source, self.plan, self.epoch, self.rank = source, plan, epoch, rank
        self.start, self.end, self.cursors, self.slots = start, end, cursors, slots

    def __iter__(self):
        info = get_worker_info()
        j = info.id if info is not None else 0
        plan, W, B = self.plan, self.plan.workers, self.plan.batch
        if info is not None and info.num_workers != W:
            raise RuntimeError(f"loader started {info.num_workers} workers for a plan of {W}")
        if info is None:
            owned = list(range(self.start, self.end))  # one process plays every logical worker in turn
        else:
            owned = list(range(self.start + j, self.end, W))
        recorder, files = Recorder(), ShardFiles()
        cursors: dict[int, _WorkerCursor] = {}
        k = self.start
        try:
            for k in owned:
                lw = k % W
                if lw not in cursors:
                    cursors[lw] = _WorkerCursor.at(plan.candidates(self.epoch, self.rank, lw, recorder),
                                                   self.cursors.get(lw, 0))
                cur = cursors[lw]
                pairs, keys = [], []
                while len(pairs) < B:
                    p, path, sample = cur.take(plan.resampled, self.rank, self.epoch)
                    if p > 0 and not plan.resampled:
                        recorder.count("refill", "samples")
                    where = f"{os.path.basename(path)}/{sample[0]}"
                    flip_rng = rng_for("flip", plan.seed, self.epoch, self.rank, lw, cur.consumed)
                    pair = self.source.load_pair(files, path, sample, flip_rng, recorder, where)
                    if pair is not None:
                        pairs.append(pair)
                        keys.append(where)
                        cur.usable(plan.resampled)
                    elif plan.resampled:
                        cur.check_resampled(self.rank, B)
                meta = {"k": k, "lw": lw, "cursor": cur.consumed}
                batch = collate_into_slot(collate_pairs, pairs, self.source.items, self.slots, j, meta)
                batch["sample_keys"] = keys
                meta.update(recorder.drain())
                batch["_meta"] = meta
                yield batch
        except _NoUsablePairs as e:  # to the main process with this worker's records (workers.consume)
            yield {"_meta": {"k": k, "fatal": str(e), **recorder.drain()}}
        finally:
            files.close()


def shard_counts(paths: list[str], manifest=None) -> dict:
    """{shard name: samples} from the manifest, or counted from the tar headers of shards it does not list."""
    counts = load_manifest_counts(manifest, paths)
    missing = [p for p in paths if os.path.basename(p) not in counts]
    if missing:
        if counts:
            log.warning("the shard manifest does not list %d shard(s) (e.g. %s): counting their samples "
                        "from the tar headers", len(missing), os.path.basename(missing[0]))
        for p in missing:
            counts[os.path.basename(p)] = len(index_shard(p).samples)
    return counts


def _check_fits(plan: EpochPlan, epoch: int, counts: dict, world_size: int, shards: str) -> None:
    if plan.batches_per_epoch(epoch, counts) == 0:
        per_rank = [sum(counts[os.path.basename(p)] for p in plan.rank_shards(epoch, r)) for r in range(world_size)]
        raise ShardSetError(f"{shards}: with {len(plan.shards)} shard(s) over {world_size} rank(s), the ranks get "
                            f"{per_rank} pairs in epoch {epoch}, fewer than pairs_per_rank={plan.batch} on some "
                            f"rank; use more (smaller) shards or a smaller batch")


def check_batch_fits(shards, data_cfg: DataConfig, world_size: int, pairs_per_rank: int, epoch: int = 0) -> None:
    """What PairLoader checks when it starts, without building one: epoch `epoch` of these shards gives
    every rank at least one batch of `pairs_per_rank` pairs (else ShardSetError). Reads manifests and
    tar headers only, so a run can check it before it loads a model."""
    paths = expand_shards(shards)
    plan = EpochPlan(tuple(paths), data_cfg.seed, world_size, max(1, data_cfg.num_workers), pairs_per_rank,
                     data_cfg.shuffle_buffer, data_cfg.resampled)
    shards_named = paths[0] + (f" (and {len(paths) - 1} more)" if len(paths) > 1 else "")
    _check_fits(plan, epoch, shard_counts(paths), world_size, shards_named)


class PairLoader:
    """Pair batches for training; see the module docstring and docs/reader.md.

    Iterating yields the rest of the current epoch (exactly `batches_per_epoch` batches per epoch
    on every rank) and then moves to the next epoch; `endless()` goes on over epochs.
    Each batch is a `PairBatch` (data_shards/batch.py: keys, dtypes, shapes; uint8 pixels, normalised
    by its `to_device()`): rows 0..B-1 are the queries, row B+i the target of query i.
    """

    def __init__(self, shards, manifest=None, *, data_cfg: DataConfig, encode_fn: Callable[[dict], dict],
                 collate_text_fn: Callable[[list], dict], rank: int, world_size: int, pairs_per_rank: int,
                 image_size: int = 224, epoch: int = 0, note_stats=None, bad_sample_log: Optional[str] = None):
        if not (0 <= rank < world_size):
            raise ValueError(f"PairLoader: rank {rank} is not in [0, world_size={world_size})")
        if pairs_per_rank <= 0:
            raise ValueError(f"PairLoader: pairs_per_rank must be > 0, got {pairs_per_rank}")
        self.paths = expand_shards(shards)
        self.data_cfg = data_cfg
        self.rank, self.world_size, self.image_size = rank, world_size, image_size
        self.num_workers = data_cfg.num_workers
        self.counts = self._counts(manifest)
        self._epoch_plan = EpochPlan(tuple(self.paths), data_cfg.seed, world_size, max(1, self.num_workers),
                                     pairs_per_rank, data_cfg.shuffle_buffer, data_cfg.resampled)
        # data.vision_cache: features instead of pixels, checked here against the shards and settings
        self.vision_cache = cache_for_loader(data_cfg, self.paths, image_size, data_cfg.random_flip, "PairLoader")
        self._source = _PairSource(data_cfg, encode_fn, collate_text_fn, image_size, self.vision_cache)
        # loss.logq_correction / loss.mask_known_positives: every batch gets sample_logq / known_pos
        # (data_shards/writing/note_stats.py), added here in the consuming process (a dict lookup per row)
        self.note_stats = note_stats
        self.epoch = epoch
        self._batches_done = 0
        self._cursors: dict = {}
        self._stats = new_stats()
        self._logged_shards: set = set()
        self._log_bad = BadSampleLog("bad sample %s: %s [%s]; %s (policy %s)",
                                     {"dropped": "pair dropped", "blanked": "kept with a blank image (has_image False)"},
                                     (data_cfg.bad_sample_policy,), path=bad_sample_log)
        # how batches' pixels reached this process: through reused shared slots or the ordinary way
        self.pixel_transport = {"slots": 0, "ordinary": 0}
        self._check_epoch()

    # -- setup
    def _counts(self, manifest) -> dict:
        return shard_counts(self.paths, manifest)

    def _check_epoch(self):
        if self._epoch_plan.has_override(self.epoch):
            return  # a resumed remainder may well be shorter than one batch
        _check_fits(self._epoch_plan, self.epoch, self.counts, self.world_size, self.describe_shards())

    # -- public
    def describe_shards(self) -> str:
        """The shard files, named for a message (the first one and how many)."""
        return self.paths[0] + (f" (and {len(self.paths) - 1} more)" if len(self.paths) > 1 else "")

    def bad_sample_summary(self) -> str:
        """"dropped: bad_image 3; blanked: ..." of the samples this loader could not use ("" when none)."""
        return "; ".join(f"{group}: {counts_line(self._stats[group])}" for group in ("dropped", "blanked")
                         if self._stats.get(group))

    @property
    def pairs_per_rank(self) -> int:
        return self._epoch_plan.batch

    @property
    def batches_per_epoch(self) -> int:
        """Batches every rank yields in the current epoch (the same number on all ranks)."""
        return self._epoch_plan.batches_per_epoch(self.epoch, self.counts)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._batches_done, self._cursors = epoch, 0, {}
        self._check_epoch()

    def stats(self) -> dict:
        """Counters for logging: batches yielded, dropped/blanked samples per reason, refill samples,
        shards with a problem."""
        return json.loads(json.dumps(self._stats))

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[dict]:
        end = self.batches_per_epoch
        if self._batches_done >= end:
            self._next_epoch()
            end = self.batches_per_epoch
        plan = self._epoch_plan
        # index this epoch's shards here: forked workers inherit the index instead of each re-reading it
        for path in (plan.shards if plan.resampled else plan.rank_shards(self.epoch, self.rank)):
            index_shard(path)
        slots = None
        if self.num_workers > 0 and self.data_cfg.pixel_slots and self.vision_cache is None:  # new slots per iteration
            slots = PixelSlots.create(self.num_workers, 2 * plan.batch, self.image_size)
        stream = _PairEpochStream(self._source, plan, self.epoch, self.rank, self._batches_done, end,
                                  dict(self._cursors), slots)
        batches = consume(stream, self.num_workers, self.data_cfg.worker_start_method, slots, self.pixel_transport,
                          PairBatch, self._batches_done, self._stats, self._on_event, "PairLoader")
        for batch, meta in self._naming_the_log(batches):
            self._cursors[meta["lw"]] = meta["cursor"]
            self._batches_done += 1
            self._stats["batches"] += 1
            if self._batches_done >= end:
                self._next_epoch()
            yield self.note_stats.annotate(batch) if self.note_stats is not None else batch

    def _naming_the_log(self, batches):
        """The batches; a NoUsableData from the workers is completed with what was dropped and where it
        is listed (every record of the failing worker was logged before it was raised)."""
        try:
            yield from batches
        except NoUsableData as e:
            counted = self.bad_sample_summary() or "no bad sample recorded"
            raise NoUsableData(f"{self.describe_shards()}: no usable pair: {e} ({counted}; every bad sample is "
                               f"listed in {self._log_bad.describe()})") from None

    def endless(self) -> Iterator[dict]:
        """Batches over epochs without end (for a step-driven training loop)."""
        empty = 0
        while True:
            n = 0
            for batch in self:
                n += 1
                yield batch
            empty = empty + 1 if n == 0 else 0
            if empty > 10:
                raise ShardSetError(f"{self.describe_shards()}: ten epochs in a row gave no batch; the shards are "
                                    f"too unequal for {self._epoch_plan.batch} pairs per rank")

    def _next_epoch(self):
        self.epoch += 1
        self._batches_done, self._cursors = 0, {}
        if self.batches_per_epoch == 0:  # possible with very unequal shards; never crash at an epoch boundary
            log.warning("epoch %d: some rank's shards hold fewer than %d pairs: the epoch has no batch",
                        self.epoch, self._epoch_plan.batch)

    def _on_event(self, where: str, reason: str, message: str, action: str) -> None:
        if action != "shard":
            self._log_bad(where, reason, message, action)
        elif where not in self._logged_shards:
            self._logged_shards.add(where)
            self._stats["shard_problems"] += 1
            log.warning("shard %s: %s (rank %d)", where, message, self.rank)

    # -- state
    def _epoch_plan_fields(self) -> dict:
        p = self._epoch_plan
        return {"world_size": p.world_size, "workers": p.workers, "pairs_per_rank": p.batch, "seed": p.seed,
                "shuffle_buffer": p.buffer, "resampled": p.resampled,
                "shards": [os.path.basename(s) for s in p.shards]}

    def state_dict(self) -> dict:
        """JSON-able position of this rank's reader (save every rank's; see load_state_dict)."""
        p = self._epoch_plan
        override = None
        if p.has_override(self.epoch):
            override = [os.path.basename(s) for s in p.epoch_shards]
        return {"version": STATE_VERSION, "kind": "PairLoader", "rank": self.rank, "epoch": self.epoch,
                "batches_done": self._batches_done, "cursors": {str(k): v for k, v in self._cursors.items()},
                "epoch_shards": override, "stats": self.stats(), **self._epoch_plan_fields()}

    def load_state_dict(self, state: Union[dict, list]) -> None:
        """Continue from a saved position.

        `state` is this rank's saved state, or the list of every old rank's states (index = old rank).
        At the same world size, workers, batch size, seed, buffer and shards it continues with exactly
        the batches that would have come next. Otherwise (e.g. another world size) it needs the list of
        all old ranks' states: it restarts the epoch with the shards no old rank had started (a
        partly read shard is not repeated) and logs so.
        """
        states = state if isinstance(state, list) else [state]
        for i, s in enumerate(states):
            if not isinstance(s, dict) or s.get("kind") != "PairLoader" or s.get("version") != STATE_VERSION:
                raise ValueError(f"PairLoader.load_state_dict: state[{i}] is not a PairLoader state "
                                 f"(version {STATE_VERSION})")
        own = None
        if isinstance(state, dict):
            own = state
        elif len(states) == states[0]["world_size"] and self.rank < len(states):
            own = states[self.rank]
        if isinstance(state, dict) and state.get("world_size") == self.world_size and state.get("rank") != self.rank:
            raise ValueError(f"PairLoader.load_state_dict: got the state of rank {state.get('rank')} on rank "
                             f"{self.rank}; give every rank its own state (or the list of all ranks' states)")
        compatible = own is not None and all(own.get(k) == v for k, v in self._epoch_plan_fields().items()) \
            and own.get("rank") == self.rank
        self._stats = new_stats()
        if own is not None and own.get("rank") == self.rank:
            merge_counts(self._stats, {k: v for k, v in own["stats"].items() if isinstance(v, dict)})
            self._stats["batches"] = own["stats"].get("batches", 0)
            self._stats["shard_problems"] = own["stats"].get("shard_problems", 0)
        if compatible:
            self.epoch = own["epoch"]
            override = own.get("epoch_shards")
            by_name = {os.path.basename(p): p for p in self.paths}
            if override is not None:
                self._epoch_plan = self._epoch_plan.with_epoch_shards(tuple(by_name[n] for n in override), self.epoch)
            self._batches_done = own["batches_done"]
            self._cursors = {int(k): v for k, v in own["cursors"].items()}
            return
        self._resume_elsewhere(states)

    def _resume_elsewhere(self, states: list) -> None:
        old_world = states[0]["world_size"]
        if len(states) != old_world or sorted(s["rank"] for s in states) != list(range(old_world)):
            raise ValueError(
                f"PairLoader.load_state_dict: the saved reader ran with world_size={old_world}, "
                f"workers={states[0]['workers']}, pairs_per_rank={states[0]['pairs_per_rank']} (now "
                f"{self.world_size}, {self._epoch_plan.workers}, {self._epoch_plan.batch}); to resume with other settings "
                f"pass the list of all {old_world} old ranks' states")
        states = sorted(states, key=lambda s: s["rank"])
        epochs = {(s["epoch"], s["batches_done"]) for s in states}
        if len(epochs) != 1:
            raise ValueError(f"PairLoader.load_state_dict: the old ranks' states are at different positions {sorted(epochs)}")
        epoch, done = epochs.pop()
        self.epoch = epoch
        self._batches_done, self._cursors = 0, {}
        by_name = {os.path.basename(p): p for p in self.paths}
        s0 = states[0]
        old_all = tuple(by_name[n] for n in s0["shards"] if n in by_name)
        old_override = tuple(by_name[n] for n in s0["epoch_shards"] if n in by_name) if s0["epoch_shards"] else None
        old = EpochPlan(old_all, s0["seed"], old_world, s0["workers"], s0["pairs_per_rank"], s0["shuffle_buffer"],
                    s0["resampled"], old_override, epoch if old_override is not None else -1)
        if done == 0 or old.resampled:
            if old.resampled or self._epoch_plan.resampled:
                log.warning("resuming a resampled stream at epoch %d with new settings (world size %d -> %d): "
                            "the epoch restarts with fresh random draws", epoch, old_world, self.world_size)
            elif old_override is not None:
                self._epoch_plan = self._epoch_plan.with_epoch_shards(old_override, epoch)
            return
        touched = set()
        for s in states:
            for lw_str, cursor in s["cursors"].items():
                for cand in itertools.islice(old.candidates(epoch, s["rank"], int(lw_str)), cursor):
                    touched.add(cand[1])
        epoch_list = old.shards_for_epoch(epoch)
        remaining = tuple(p for p in epoch_list if p not in touched)
        self._epoch_plan = self._epoch_plan.with_epoch_shards(remaining, epoch)
        log.warning("resuming epoch %d at world size %d with %d worker(s)/rank and %d pairs/rank (saved at %d, %d, "
                    "%d after %d batches): %d shard(s) already started are not repeated; the epoch restarts with its "
                    "%d remaining shard(s) (%d batches per rank)", epoch, self.world_size, self._epoch_plan.workers,
                    self._epoch_plan.batch, old_world, old.workers, old.batch, done, len(touched), len(remaining),
                    self.batches_per_epoch)
