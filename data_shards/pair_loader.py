"""Streaming readers over WebDataset tar shards: pair batches for training, notes for embedding.

Design (details and the reasons in docs/reader.md):

* Shards are local tar files in the WebDataset layout (`{key}.{member}`). Each process builds a
  header-only index of a shard (member offsets, no payload read) and reads the members of a sample
  by seeking. Skipping samples (resume) therefore costs index arithmetic only: nothing is read or
  decoded.
* Epoch plan: the shard list is shuffled with (seed, epoch) and dealt round-robin to the ranks
  (explicit node split). A rank's samples, in shard order, go through a shuffle buffer seeded by
  (seed, epoch, rank): this is the rank's sample stream. It is the same in all loader workers;
  worker w takes the batch-sized chunks k with k % W == w of it (explicit worker split), so without
  bad samples batch k is chunk k whatever the number of workers.
* Equal batches per rank, with no communication: every rank computes
  `batches_per_epoch = min over ranks(pairs in that rank's shards per the manifest) // pairs_per_rank`.
  A worker whose chunks run short (dropped samples, truncated shard) refills from its chunks past
  the planned ones and then from a further, reshuffled pass over the rank's shards.
* The position is (epoch, batches done, per-worker cursor = candidates consumed). Every batch
  carries its worker's cursor, so `state_dict()` reflects exactly what the consumer has received.
"""
from __future__ import annotations

import gc
import glob
import itertools
import json
import logging
import mmap
import os
import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Union

import braceexpand
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_shards.collate import (NoteItem, collate_notes, collate_pairs, normalize_pixels, note_text_dict,
                                pixel_buffer, prepare_image)
from data_shards.config import DataConfig
from data_shards.images import BadImage, open_image

log = logging.getLogger("data_shards.reader")

STATE_VERSION = 1
IMAGE_REASONS = ("bad_image", "image_over_pixel_limit", "truncated_image")


# ----------------------------------------------------------------------------- shard lists

def expand_shards(shards: Union[str, Iterable[str]]) -> list[str]:
    """Brace patterns (`a-{000000..000003}.tar`), globs, or a list of either -> sorted unique paths.

    Raises FileNotFoundError naming the pattern when it matches nothing or names a missing file.
    """
    patterns = [shards] if isinstance(shards, str) else list(shards)
    if not patterns or any(not isinstance(p, str) or not p.strip() for p in patterns):
        raise ValueError(f"shards: expected a pattern or a list of paths, got {shards!r}")
    paths: list[str] = []
    for pattern in patterns:
        for name in braceexpand.braceexpand(pattern.strip()):
            if glob.has_magic(name):
                found = sorted(glob.glob(name))
                if not found:
                    raise FileNotFoundError(f"shards: pattern {name!r} (from {pattern!r}) matches no file")
                paths.extend(found)
            elif os.path.isfile(name):
                paths.append(name)
            else:
                raise FileNotFoundError(f"shards: {name!r} (from {pattern!r}) does not exist")
    paths = sorted(set(os.path.abspath(p) for p in paths))
    names = [os.path.basename(p) for p in paths]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"shards: the same shard name in several folders: {dupes} (names identify shards in the state)")
    return paths


def load_manifest_counts(manifest: Union[None, str, dict], paths: list[str]) -> dict[str, int]:
    """Per-shard sample counts {basename: count} from a manifest (path, dict, or None: look for
    `manifest.json` next to the shards). Shards the manifest does not list are left out."""
    if manifest is None:
        sources = [(cand, _read_manifest(cand)) for cand in
                   sorted({os.path.join(os.path.dirname(p), "manifest.json") for p in paths}) if os.path.isfile(cand)]
    elif isinstance(manifest, str):
        sources = [(manifest, _read_manifest(manifest))]
    elif isinstance(manifest, dict) and isinstance(manifest.get("shards"), list):
        sources = [("manifest", manifest)]
    else:
        raise ValueError(f"manifest: expected a path or a mapping with a 'shards' list, got {type(manifest).__name__}")
    counts = {}
    for source, data in sources:
        for i, entry in enumerate(data["shards"]):
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or \
                    not isinstance(entry.get("count"), int) or isinstance(entry.get("count"), bool) or entry["count"] < 0:
                raise ValueError(f"{source}: shards[{i}]: needs 'name' (str) and 'count' (int >= 0), got {entry!r}")
            counts[os.path.basename(entry["name"])] = entry["count"]
    wanted = {os.path.basename(p) for p in paths}
    return {k: v for k, v in counts.items() if k in wanted}


def _read_manifest(path: str) -> dict:
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read the shard manifest: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("shards"), list):
        raise ValueError(f"{path}: expected a mapping with a 'shards' list")
    return data


# ----------------------------------------------------------------------------- tar index

# A sample: (key, ((member_ext, data_offset, size, truncated), ...))
Sample = tuple


@dataclass
class ShardIndex:
    path: str
    samples: list  # list[Sample]
    problem: Optional[str]  # a shard-level problem (unreadable, truncated), else None


_INDEX_CACHE: "OrderedDict[tuple, ShardIndex]" = OrderedDict()
_INDEX_CACHE_SHARDS = 512


_ZERO_BLOCK = bytes(512)


def _octal(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256 for large sizes
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0  # int() parses ASCII bytes directly


def _scan_tar(path: str, size: int):
    """Yield (name, data_offset, data_size) of the regular files of a tar, reading headers only.

    Handles ustar, GNU long names ('L') and pax path records ('x'); raises ValueError at the
    first header that is not a tar header (with its offset). Every rank indexes its shards before
    its workers start, so this loop is kept lean: the checksum is one C-level `sum` over the header.
    """
    with open(path, "rb") as fh:
        if size == 0:
            raise EOFError("the file is empty")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            off, long_name = 0, None
            while off + 512 <= size:
                hdr = mm[off: off + 512]
                if hdr == _ZERO_BLOCK:
                    return  # end-of-archive marker
                try:
                    stored = _octal(hdr[148:156])
                except ValueError:
                    stored = -1
                # the checksum counts its own 8-byte field as spaces (8 * 32 = 256)
                if stored != sum(hdr) - sum(hdr[148:156]) + 256:
                    raise ValueError(f"bad tar header checksum at offset {off}")
                member_size = _octal(hdr[124:136])
                kind = hdr[156:157]
                data_off = off + 512
                next_off = data_off + (member_size + 511) // 512 * 512
                if kind == b"L":
                    long_name = mm[data_off: data_off + member_size].split(b"\0", 1)[0].decode("utf-8", "replace")
                elif kind == b"x":
                    for rec in mm[data_off: data_off + member_size].decode("utf-8", "replace").split("\n"):
                        if " path=" in rec:
                            long_name = rec.split(" path=", 1)[1]
                elif kind in (b"0", b"\0", b"7"):
                    if long_name is not None:
                        name = long_name
                    else:
                        name = hdr[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
                        if hdr[257:262] == b"ustar" and hdr[345]:
                            prefix = hdr[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
                            if prefix:
                                name = f"{prefix}/{name}"
                    long_name = None
                    yield name, data_off, member_size
                else:
                    long_name = None  # directories, links, global pax headers
                off = next_off
            if off != size:
                raise EOFError(f"the header at offset {off} is cut off by the end of the file")
            raise EOFError("the end-of-archive marker is missing")


def index_shard(path: str) -> ShardIndex:
    """Header-only index of a tar shard; never raises for a damaged shard (see `.problem`).

    Cached per process (by path, size and mtime), so a loader that indexes its shards before
    starting its workers hands the index to them through fork.
    """
    try:
        st = os.stat(path)
    except OSError as e:
        return ShardIndex(path, [], f"cannot read the shard: {e}")
    cache_key = (path, st.st_size, st.st_mtime_ns)
    hit = _INDEX_CACHE.get(cache_key)
    if hit is not None:
        _INDEX_CACHE.move_to_end(cache_key)
        return hit
    # The index is thousands of small tuples that all live on. Left to the collector, they set off
    # collections that find nothing, and soon a full one: in a rank that has imported torch that
    # full collection took 0.13-0.15 s, longer than indexing 4 shards. So the collector is paused
    # while they are made, and then they go straight to the oldest generation (gc.freeze() +
    # gc.unfreeze() moves every tracked object there without a collection).
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        result = _index_uncached(path, st.st_size)
    finally:
        if _gc_freeze_if_none_frozen():
            gc.unfreeze()
        if gc_was_on:
            gc.enable()
    _INDEX_CACHE[cache_key] = result
    while len(_INDEX_CACHE) > _INDEX_CACHE_SHARDS:
        _INDEX_CACHE.popitem(last=False)
    return result


def _gc_freeze_if_none_frozen() -> bool:
    """gc.freeze(), unless the process already holds frozen objects: the caller's gc.unfreeze() would
    then unfreeze those too, so nothing is done (True when it froze)."""
    if gc.get_freeze_count():
        return False
    gc.freeze()
    return True


def _index_uncached(path: str, file_size: int) -> ShardIndex:
    samples, problem = [], None
    cur_key, cur_members = None, []
    try:
        for name, data_off, size in _scan_tar(path, file_size):
            dirname, base = os.path.split(name)
            if "." not in base:
                continue
            stem, ext = base.split(".", 1)
            key = f"{dirname}/{stem}" if dirname else stem
            truncated = data_off + size > file_size
            if key != cur_key and cur_members:
                samples.append((cur_key, tuple(cur_members)))
                cur_members = []
            cur_key = key
            cur_members.append((ext.lower(), data_off, size, truncated))
            if truncated:
                problem = f"truncated: member {name} ends past the end of the file"
                break
    except EOFError as e:
        problem = f"truncated: {e}"
    except (ValueError, OSError) as e:
        problem = f"damaged tar ({type(e).__name__}: {e})"
    if cur_members:
        samples.append((cur_key, tuple(cur_members)))
    return ShardIndex(path, samples, problem)


class _BadSample(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class _ShardFiles:
    """A few open shard files per process (samples of one shard mostly come one after another)."""

    def __init__(self, keep: int = 8):
        self.keep = keep
        self.files: "OrderedDict[str, object]" = OrderedDict()

    def read(self, path: str, offset: int, size: int) -> bytes:
        fh = self.files.get(path)
        if fh is None:
            fh = open(path, "rb")
            self.files[path] = fh
            while len(self.files) > self.keep:
                self.files.popitem(last=False)[1].close()
        else:
            self.files.move_to_end(path)
        fh.seek(offset)
        return fh.read(size)

    def close(self):
        for fh in self.files.values():
            fh.close()
        self.files.clear()


def _read_members(files: _ShardFiles, path: str, sample: Sample, wanted: Iterable[str]) -> dict:
    """{ext: bytes} for the wanted members present; a truncated member raises _BadSample."""
    members = {ext: (off, size, trunc) for ext, off, size, trunc in sample[1]}
    out = {}
    for ext in wanted:
        if ext not in members:
            continue
        off, size, trunc = members[ext]
        try:
            data = files.read(path, off, size) if not trunc else b""
        except OSError as e:
            raise _BadSample("read_error", f"cannot read member {ext}: {e}") from None
        if trunc or len(data) != size:
            raise _BadSample("truncated_image" if ext.endswith(("jpg", "jpeg", "png", "webp")) else "truncated",
                             f"member {ext} is truncated ({len(data)} of {size} bytes)")
        out[ext] = data
    return out


def _parse_note(raw: bytes, member: str) -> dict:
    try:
        note = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _BadSample("bad_json", f"{member}: not valid JSON ({e})") from None
    if not isinstance(note, dict):
        raise _BadSample("bad_json", f"{member}: expected a JSON object, got {type(note).__name__}")
    for key in ("note_id", "title", "content"):
        if not isinstance(note.get(key), str):
            got = "missing" if key not in note else f"{type(note[key]).__name__} {note[key]!r}"[:80]
            raise _BadSample("missing_field", f"{member}: field {key!r} must be a string ({got})")
    if not note["note_id"]:
        raise _BadSample("missing_field", f"{member}: field 'note_id' is empty")
    topics = note.get("topics")
    if topics is not None and (not isinstance(topics, list) or not all(isinstance(t, str) for t in topics)):
        raise _BadSample("missing_field", f"{member}: field 'topics' must be a list of strings")
    return note


def _decode_image(raw: Optional[bytes], member: str, max_pixels: int, image_size: int, flip: bool):
    if raw is None:
        return None
    try:
        img = open_image(raw, max_pixels)
    except BadImage as e:
        msg = str(e)
        reason = "image_over_pixel_limit" if ("exceeds" in msg or "DecompressionBomb" in msg) else "bad_image"
        raise _BadSample(reason, f"{member}: {msg}") from None
    return prepare_image(img, image_size, flip=flip)


def _image_member(sample: Sample, prefix: str) -> Optional[str]:
    exts = {m[0] for m in sample[1]}
    for ext in ("jpg", "jpeg", "png", "webp"):
        name = f"{prefix}{ext}"
        if name in exts:
            return name
    return None


class _Recorder:
    """Per-process counters and bad-sample events; drained into every batch it sends."""

    def __init__(self):
        self.events: list = []
        self.counts: dict = {}

    def count(self, group: str, reason: str, n: int = 1):
        bucket = self.counts.setdefault(group, {})
        bucket[reason] = bucket.get(reason, 0) + n

    def bad(self, where: str, reason: str, message: str, action: str):
        self.count(action, reason)
        self.events.append((where, reason, message, action))

    def shard_problem(self, where: str, message: str):
        self.events.append((where, "shard", message, "shard"))

    def drain(self) -> dict:
        out = {"events": self.events, "counts": self.counts}
        self.events, self.counts = [], {}
        return out


def _merge_counts(into: dict, delta: dict):
    for group, bucket in delta.items():
        dst = into.setdefault(group, {})
        for reason, n in bucket.items():
            dst[reason] = dst.get(reason, 0) + n


def _rng(*parts) -> random.Random:
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


# ----------------------------------------------------------------------------- the epoch plan

@dataclass(frozen=True)
class _Plan:
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
        _rng("shards", self.seed, epoch).shuffle(order)
        return order[rank::self.world_size]

    def batches_per_epoch(self, epoch: int, counts: dict) -> int:
        if self.resampled:
            total = sum(counts[os.path.basename(p)] for p in self.shards)
            return max(1, total // (self.world_size * self.batch))
        per_rank = [sum(counts[os.path.basename(p)] for p in self.rank_shards(epoch, r))
                    for r in range(self.world_size)]
        return min(per_rank) // self.batch

    def candidates(self, epoch: int, rank: int, lw: int, recorder: Optional[_Recorder] = None) -> Iterator:
        """Worker `lw`'s endless candidate stream: (pass, shard path, sample)."""
        if self.resampled:
            yield from self._resampled_candidates(epoch, rank, lw, recorder)
            return
        shards = self.rank_shards(epoch, rank)
        for p in itertools.count():
            order = list(shards)
            if p > 0:
                _rng("refill-shards", self.seed, epoch, rank, p).shuffle(order)
            indexes = [self._index(path, recorder if p == 0 else None) for path in order]
            n_pass = sum(len(ix.samples) for ix in indexes)
            if n_pass == 0:
                raise RuntimeError(f"rank {rank}: no sample can be read from its shards of epoch {epoch}: "
                                   f"{[os.path.basename(s) for s in shards]}")
            # A pass too short to give every worker a chunk is not split (only in refill passes).
            split = p == 0 or n_pass >= self.workers * self.batch
            stream = _buffer_shuffle(((ix.path, s) for ix in indexes for s in ix.samples), self.buffer,
                                     _rng("samples", self.seed, epoch, rank, p))
            for i, (path, sample) in enumerate(stream):
                if not split or (i // self.batch) % self.workers == lw:
                    yield p, path, sample

    def _resampled_candidates(self, epoch, rank, lw, recorder):
        draw_rng = _rng("resample", self.seed, epoch, rank, lw)

        def draws():
            for d in itertools.count():
                path = self.shards[draw_rng.randrange(len(self.shards))]
                for s in self._index(path, recorder).samples:
                    yield d, path, s

        yield from _buffer_shuffle(draws(), self.buffer, _rng("samples", self.seed, epoch, rank, lw))

    @staticmethod
    def _index(path: str, recorder: Optional[_Recorder]) -> ShardIndex:
        ix = index_shard(path)
        if ix.problem and recorder is not None:
            recorder.shard_problem(os.path.basename(path), ix.problem)
        return ix


# ----------------------------------------------------------------------------- moving pixels

PREFETCH = 2  # the DataLoader's prefetch_factor: batches requested ahead from each worker
SLOTS_PER_WORKER = PREFETCH + 1  # see _PixelSlots


class _PixelSlots:
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
    def create(cls, workers: int, rows: int, image_size: int, shm_dir: str = "/dev/shm") -> Optional["_PixelSlots"]:
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


def _collate_into_slot(collate, items, source, slots: Optional[_PixelSlots], worker: int, meta: dict) -> dict:
    """Collate a batch, its pixels into a free slot of `worker` when there is one (see _PixelSlots)."""
    claim = slots.claim(worker) if slots is not None else None
    batch = collate(items, source.collate_text_fn, source.image_size, normalize=False,
                    out=None if claim is None else claim[1])
    if claim is not None:
        del batch["pixel_values"]
        meta.update(worker=worker, slot=claim[0])
    return batch


def _pixels_from_slot(batch: dict, meta: dict, slots: Optional[_PixelSlots], transport: dict) -> None:
    slot = meta.get("slot")
    if slot is None:
        transport["ordinary"] += 1
        return
    batch["pixel_values"] = slots.take(meta["worker"], slot, len(batch["note_id_strs"]))
    transport["slots"] += 1


# ----------------------------------------------------------------------------- pair loader

class _PairSource:
    """What a worker needs to turn candidates into batches (picklable)."""

    def __init__(self, data_cfg: DataConfig, encode_fn, collate_text_fn, image_size: int):
        self.policy = data_cfg.bad_sample_policy
        self.max_pixels = data_cfg.max_image_pixels
        self.random_flip = data_cfg.random_flip
        self.seed = data_cfg.seed
        self.encode_fn = encode_fn
        self.collate_text_fn = collate_text_fn
        self.image_size = image_size

    def load_pair(self, files: _ShardFiles, path: str, sample: Sample, flip_rng: random.Random,
                  recorder: _Recorder, where: str):
        """(query NoteItem, target NoteItem), or None when the pair is dropped."""
        try:
            exts = {m[0] for m in sample[1]}
            for member in ("q.json", "t.json"):
                if member not in exts:
                    raise _BadSample("missing_member", f"member {member} is missing (members: {sorted(exts)})")
            q_img, t_img = _image_member(sample, "q."), _image_member(sample, "t.")
            raw = _read_members(files, path, sample, ["q.json", "t.json", "pair.json"])
            q_note, t_note = _parse_note(raw["q.json"], "q.json"), _parse_note(raw["t.json"], "t.json")
            if "pair.json" in raw:
                try:
                    pair = json.loads(raw["pair.json"])
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise _BadSample("bad_json", f"pair.json: not valid JSON ({e})") from None
                if not isinstance(pair, dict) or pair.get("query_id") != q_note["note_id"] or \
                        pair.get("target_id") != t_note["note_id"]:
                    raise _BadSample("malformed_pair", f"pair.json {str(pair)[:120]} does not match q.json/t.json "
                                     f"({q_note['note_id']!r}, {t_note['note_id']!r})")
            flips = (self.random_flip and flip_rng.random() < 0.5, self.random_flip and flip_rng.random() < 0.5)
            items = []
            for note, img_member, flip in ((q_note, q_img, flips[0]), (t_note, t_img, flips[1])):
                pixels = None
                if img_member is not None:
                    try:
                        img_raw = _read_members(files, path, sample, [img_member])[img_member]
                        pixels = _decode_image(img_raw, img_member, self.max_pixels, self.image_size, flip)
                    except _BadSample as e:
                        if self.policy != "blank_image" or e.reason not in IMAGE_REASONS:
                            raise
                        recorder.bad(where, e.reason, str(e), "blanked")
                        pixels = None
                try:
                    encoding = self.encode_fn(note_text_dict(note, pixels is not None))
                except Exception as e:  # the prompter rejected this note's text
                    raise _BadSample("encode_error", f"encode_fn failed on note {note['note_id']!r}: "
                                     f"{type(e).__name__}: {e}") from None
                items.append(NoteItem(note["note_id"], encoding, pixels))
            return items[0], items[1]
        except _BadSample as e:
            recorder.bad(where, e.reason, str(e), "dropped")
            return None


class _PairEpochStream(IterableDataset):
    """Yields this rank's batches [start, end) of one epoch; each worker the ones it owns."""

    def __init__(self, source: _PairSource, plan: _Plan, epoch: int, rank: int, start: int, end: int,
                 cursors: dict, slots: Optional[_PixelSlots] = None):
        self.source, self.plan, self.epoch, self.rank = source, plan, epoch, rank
        self.start, self.end, self.cursors, self.slots = start, end, cursors, slots

    def __iter__(self):
        info = get_worker_info()
        j = info.id if info is not None else 0
        plan, W, B = self.plan, self.plan.workers, self.plan.batch
        if info is not None and info.num_workers != W:
            raise RuntimeError(f"loader started {info.num_workers} workers for a plan of {W}")
        first = self.start + j
        if info is None:
            owned = list(range(self.start, self.end))  # one process plays every logical worker in turn
        else:
            owned = list(range(first, self.end, W))
        recorder = _Recorder()
        files = _ShardFiles()
        streams: dict = {}
        try:
            for k in owned:
                lw = k % W
                if lw not in streams:
                    cursor = self.cursors.get(lw, 0)
                    cands = plan.candidates(self.epoch, self.rank, lw, recorder)
                    # resume: skip consumed candidates by index arithmetic only (nothing read or decoded)
                    for _ in range(cursor):
                        next(cands)
                    streams[lw] = [cands, cursor, 0, -1]  # stream, cursor, good samples in pass, pass
                st = streams[lw]
                pairs, keys = [], []
                while len(pairs) < B:
                    p, path, sample = next(st[0])
                    if plan.resampled:
                        st[2] += 1  # candidates since the last usable one
                    elif p != st[3]:
                        if st[3] >= 1 and st[2] == 0:
                            raise RuntimeError(f"rank {self.rank}: a whole refill pass over its shards gave no "
                                               f"usable pair (epoch {self.epoch}); see the bad-sample log")
                        st[3], st[2] = p, 0
                    st[1] += 1
                    if p > 0 and not plan.resampled:
                        recorder.count("refill", "samples")
                    where = f"{os.path.basename(path)}/{sample[0]}"
                    flip_rng = _rng("flip", plan.seed, self.epoch, self.rank, lw, st[1])
                    pair = self.source.load_pair(files, path, sample, flip_rng, recorder, where)
                    if pair is not None:
                        pairs.append(pair)
                        keys.append(where)
                        st[2] = 0 if plan.resampled else st[2] + 1
                    elif plan.resampled and st[2] > 10_000 + 10 * B:
                        raise RuntimeError(f"rank {self.rank}: {st[2]} resampled candidates in a row were "
                                           f"unusable; see the bad-sample log")
                meta = {"k": k, "lw": lw, "cursor": st[1]}
                batch = _collate_into_slot(collate_pairs, pairs, self.source, self.slots, j, meta)
                batch["sample_keys"] = keys
                meta.update(recorder.drain())
                batch["_meta"] = meta
                yield batch
        finally:
            files.close()


def _worker_init(_):
    torch.set_num_threads(1)


def _start_workers(stream: IterableDataset, num_workers: int, start_method: str = "fork"):
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


def _new_stats() -> dict:
    return {"batches": 0, "dropped": {}, "blanked": {}, "refill": {}, "shard_problems": 0}


class PairLoader:
    """Pair batches for training; see the module docstring and docs/reader.md.

    Iterating yields the rest of the current epoch (exactly `batches_per_epoch` batches per epoch
    on every rank) and then moves to the next epoch; `endless()` goes on over epochs.
    Each batch: the text tensors of `collate_text_fn`, `pixel_values` [2B,3,S,S] (CLIP-normalised
    float32; with `normalize=False` the uint8 pixels, for the consumer to normalise with
    `collate.normalize_pixels` on its own device: 4x less to copy there), `has_image` [2B]
    bool, `note_ids` [2B] long (note_id_hash), `note_id_strs` (2B str), `sample_keys` (B str,
    "shard/key" of each pair): rows 0..B-1 are the queries, row B+i the target of query i.
    """

    def __init__(self, shards, manifest=None, *, data_cfg: DataConfig, encode_fn: Callable[[dict], dict],
                 collate_text_fn: Callable[[list], dict], rank: int, world_size: int, pairs_per_rank: int,
                 image_size: int = 224, epoch: int = 0, normalize: bool = True):
        if not (0 <= rank < world_size):
            raise ValueError(f"PairLoader: rank {rank} is not in [0, world_size={world_size})")
        if pairs_per_rank <= 0:
            raise ValueError(f"PairLoader: pairs_per_rank must be > 0, got {pairs_per_rank}")
        self.paths = expand_shards(shards)
        self.data_cfg = data_cfg
        self.rank, self.world_size, self.image_size = rank, world_size, image_size
        self.normalize = normalize
        self.num_workers = data_cfg.num_workers
        self.counts = self._counts(manifest)
        self._plan = _Plan(tuple(self.paths), data_cfg.seed, world_size, max(1, self.num_workers), pairs_per_rank,
                           data_cfg.shuffle_buffer, data_cfg.resampled)
        self._source = _PairSource(data_cfg, encode_fn, collate_text_fn, image_size)
        self.epoch = epoch
        self._batches_done = 0
        self._cursors: dict = {}
        self._stats = _new_stats()
        self._logged: set = set()
        # how batches' pixels reached this process: through reused shared slots or the ordinary way
        self.pixel_transport = {"slots": 0, "ordinary": 0}
        self._check_epoch()

    # -- setup
    def _counts(self, manifest) -> dict:
        counts = load_manifest_counts(manifest, self.paths)
        missing = [p for p in self.paths if os.path.basename(p) not in counts]
        if missing:
            if counts:
                log.warning("the shard manifest does not list %d shard(s) (e.g. %s): counting their samples "
                            "from the tar headers", len(missing), os.path.basename(missing[0]))
            for p in missing:
                counts[os.path.basename(p)] = len(index_shard(p).samples)
        return counts

    def _check_epoch(self):
        if self._plan.epoch_shards is not None and self.epoch == self._plan.override_epoch:
            return  # a resumed remainder may well be shorter than one batch
        n = self.batches_per_epoch
        if n == 0:
            per_rank = [sum(self.counts[os.path.basename(p)] for p in self._plan.rank_shards(self.epoch, r))
                        for r in range(self.world_size)]
            raise ValueError(f"PairLoader: with {len(self.paths)} shard(s) over {self.world_size} rank(s), the "
                             f"ranks get {per_rank} pairs in epoch {self.epoch}, fewer than pairs_per_rank="
                             f"{self._plan.batch} on some rank; use more (smaller) shards or a smaller batch")

    # -- public
    @property
    def pairs_per_rank(self) -> int:
        return self._plan.batch

    @property
    def batches_per_epoch(self) -> int:
        """Batches every rank yields in the current epoch (the same number on all ranks)."""
        return self._plan.batches_per_epoch(self.epoch, self.counts)

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
        # index this epoch's shards here: forked workers inherit the index instead of each re-reading it
        for path in (self._plan.shards if self._plan.resampled else self._plan.rank_shards(self.epoch, self.rank)):
            index_shard(path)
        slots = None
        if self.num_workers > 0 and self.data_cfg.pixel_slots:  # new slots per iteration: no stray writer
            slots = _PixelSlots.create(self.num_workers, 2 * self._plan.batch, self.image_size)
        stream = _PairEpochStream(self._source, self._plan, self.epoch, self.rank, self._batches_done, end,
                                  dict(self._cursors), slots)
        if self.num_workers > 0:
            it = _start_workers(stream, self.num_workers, self.data_cfg.worker_start_method)
        else:
            it = iter(stream)
        for batch in it:
            meta = batch.pop("_meta")
            _pixels_from_slot(batch, meta, slots, self.pixel_transport)
            if self.normalize:
                batch["pixel_values"] = normalize_pixels(batch["pixel_values"], batch["image_present"])
            if meta["k"] != self._batches_done:
                raise RuntimeError(f"PairLoader: got batch {meta['k']} where batch {self._batches_done} was due")
            self._absorb(meta)
            self._cursors[meta["lw"]] = meta["cursor"]
            self._batches_done += 1
            self._stats["batches"] += 1
            if self._batches_done >= end:
                self._next_epoch()
            yield batch

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
                raise RuntimeError("PairLoader: ten epochs in a row gave no batch; the shards are too unequal")

    def _next_epoch(self):
        self.epoch += 1
        self._batches_done, self._cursors = 0, {}
        if self.batches_per_epoch == 0:  # possible with very unequal shards; never crash at an epoch boundary
            log.warning("epoch %d: some rank's shards hold fewer than %d pairs: the epoch has no batch",
                        self.epoch, self._plan.batch)

    def _absorb(self, meta: dict):
        _merge_counts(self._stats, {k: v for k, v in meta["counts"].items()})
        for where, reason, message, action in meta["events"]:
            if action == "shard":
                if ("shard", where) not in self._logged:
                    self._logged.add(("shard", where))
                    self._stats["shard_problems"] += 1
                    log.warning("shard %s: %s (rank %d)", where, message, self.rank)
                continue
            if (where, reason) not in self._logged:
                self._logged.add((where, reason))
                what = "pair dropped" if action == "dropped" else "kept with a blank image (has_image False)"
                log.warning("bad sample %s: %s [%s]; %s (policy %s)", where, message, reason, what,
                            self.data_cfg.bad_sample_policy)

    # -- state
    def _plan_fields(self) -> dict:
        p = self._plan
        return {"world_size": p.world_size, "workers": p.workers, "pairs_per_rank": p.batch, "seed": p.seed,
                "shuffle_buffer": p.buffer, "resampled": p.resampled,
                "shards": [os.path.basename(s) for s in p.shards]}

    def state_dict(self) -> dict:
        """JSON-able position of this rank's reader (save every rank's; see load_state_dict)."""
        p = self._plan
        override = None
        if p.epoch_shards is not None and p.override_epoch == self.epoch:
            override = [os.path.basename(s) for s in p.epoch_shards]
        return {"version": STATE_VERSION, "kind": "PairLoader", "rank": self.rank, "epoch": self.epoch,
                "batches_done": self._batches_done, "cursors": {str(k): v for k, v in self._cursors.items()},
                "epoch_shards": override, "stats": self.stats(), **self._plan_fields()}

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
        compatible = own is not None and all(own.get(k) == v for k, v in self._plan_fields().items()) \
            and own.get("rank") == self.rank
        self._stats = _new_stats()
        if own is not None and own.get("rank") == self.rank:
            _merge_counts(self._stats, {k: v for k, v in own["stats"].items() if isinstance(v, dict)})
            self._stats["batches"] = own["stats"].get("batches", 0)
            self._stats["shard_problems"] = own["stats"].get("shard_problems", 0)
        if compatible:
            self.epoch = own["epoch"]
            override = own.get("epoch_shards")
            by_name = {os.path.basename(p): p for p in self.paths}
            if override is not None:
                self._plan = self._with_override(tuple(by_name[n] for n in override), self.epoch)
            self._batches_done = own["batches_done"]
            self._cursors = {int(k): v for k, v in own["cursors"].items()}
            return
        self._resume_elsewhere(states)

    def _with_override(self, shards: tuple, epoch: int) -> _Plan:
        p = self._plan
        return _Plan(p.shards, p.seed, p.world_size, p.workers, p.batch, p.buffer, p.resampled, shards, epoch)

    def _resume_elsewhere(self, states: list) -> None:
        old_world = states[0]["world_size"]
        if len(states) != old_world or sorted(s["rank"] for s in states) != list(range(old_world)):
            raise ValueError(
                f"PairLoader.load_state_dict: the saved reader ran with world_size={old_world}, "
                f"workers={states[0]['workers']}, pairs_per_rank={states[0]['pairs_per_rank']} (now "
                f"{self.world_size}, {self._plan.workers}, {self._plan.batch}); to resume with other settings "
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
        old = _Plan(old_all, s0["seed"], old_world, s0["workers"], s0["pairs_per_rank"], s0["shuffle_buffer"],
                    s0["resampled"], old_override, epoch if old_override is not None else -1)
        if done == 0 or old.resampled:
            if old.resampled or self._plan.resampled:
                log.warning("resuming a resampled stream at epoch %d with new settings (world size %d -> %d): "
                            "the epoch restarts with fresh random draws", epoch, old_world, self.world_size)
            elif old_override is not None:
                self._plan = self._with_override(old_override, epoch)
            return
        touched = set()
        for s in states:
            for lw_str, cursor in s["cursors"].items():
                for cand in itertools.islice(old.candidates(epoch, s["rank"], int(lw_str)), cursor):
                    touched.add(cand[1])
        epoch_list = old.shards_for_epoch(epoch)
        remaining = tuple(p for p in epoch_list if p not in touched)
        self._plan = self._with_override(remaining, epoch)
        log.warning("resuming epoch %d at world size %d with %d worker(s)/rank and %d pairs/rank (saved at %d, %d, "
                    "%d after %d batches): %d shard(s) already started are not repeated; the epoch restarts with its "
                    "%d remaining shard(s) (%d batches per rank)", epoch, self.world_size, self._plan.workers,
                    self._plan.batch, old_world, old.workers, old.batch, done, len(touched), len(remaining),
                    self.batches_per_epoch)


# ----------------------------------------------------------------------------- notes loader

class _NotesSource:
    def __init__(self, data_cfg: DataConfig, encode_fn, collate_text_fn, image_size: int):
        self.max_pixels = data_cfg.max_image_pixels
        self.encode_fn = encode_fn
        self.collate_text_fn = collate_text_fn
        self.image_size = image_size

    def dummy(self) -> NoteItem:
        note = {"note_id": "", "title": "", "content": "", "topics": []}
        return NoteItem("", self.encode_fn(note_text_dict(note, False)), None, is_dummy=True)

    def load_note(self, files: _ShardFiles, path: str, sample: Sample, recorder: _Recorder, where: str) -> NoteItem:
        try:
            exts = {m[0] for m in sample[1]}
            if "json" not in exts:
                raise _BadSample("missing_member", f"member json is missing (members: {sorted(exts)})")
            note = _parse_note(_read_members(files, path, sample, ["json"])["json"], "json")
            pixels = None
            img_member = _image_member(sample, "")
            if img_member is not None:
                try:
                    raw = _read_members(files, path, sample, [img_member])[img_member]
                    pixels = _decode_image(raw, img_member, self.max_pixels, self.image_size, False)
                except _BadSample as e:
                    if e.reason not in IMAGE_REASONS:
                        raise
                    recorder.bad(where, e.reason, str(e), "blanked")
            try:
                encoding = self.encode_fn(note_text_dict(note, pixels is not None))
            except Exception as e:
                raise _BadSample("encode_error", f"encode_fn failed on note {note['note_id']!r}: "
                                 f"{type(e).__name__}: {e}") from None
            return NoteItem(note["note_id"], encoding, pixels)
        except _BadSample as e:
            recorder.bad(where, e.reason, str(e), "unusable")
            return self.dummy()


class _NotesStream(IterableDataset):
    def __init__(self, source: _NotesSource, items: list, rank: int, world_size: int, batch: int, n_batches: int,
                 workers: int, slots: Optional[_PixelSlots] = None):
        self.source, self.items, self.rank, self.world_size = source, items, rank, world_size
        self.batch, self.n_batches, self.workers, self.slots = batch, n_batches, workers, slots

    def __iter__(self):
        info = get_worker_info()
        owned = range(info.id, self.n_batches, info.num_workers) if info is not None else range(self.n_batches)
        recorder, files = _Recorder(), _ShardFiles()
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
                batch = _collate_into_slot(collate_notes, notes, self.source, self.slots,
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
    """

    def __init__(self, shards, data_cfg: DataConfig, encode_fn: Callable[[dict], dict],
                 collate_text_fn: Callable[[list], dict], rank: int, world_size: int, batch_size: int,
                 image_size: int = 224, normalize: bool = True):
        if not (0 <= rank < world_size):
            raise ValueError(f"NotesLoader: rank {rank} is not in [0, world_size={world_size})")
        if batch_size <= 0:
            raise ValueError(f"NotesLoader: batch_size must be > 0, got {batch_size}")
        self.paths = expand_shards(shards)
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.normalize = normalize  # False: uint8 pixel_values, as in PairLoader
        self.num_workers = data_cfg.num_workers
        self.data_cfg = data_cfg
        self._source = _NotesSource(data_cfg, encode_fn, collate_text_fn, image_size)
        self._items = []
        self._stats = _new_stats()
        self._logged: set = set()
        self.pixel_transport = {"slots": 0, "ordinary": 0}
        for path in self.paths:
            ix = index_shard(path)
            if ix.problem:
                self._stats["shard_problems"] += 1
                log.warning("shard %s: %s", os.path.basename(path), ix.problem)
            self._items.extend((path, s) for s in ix.samples)
        per_step = world_size * batch_size
        self._n_batches = (len(self._items) + per_step - 1) // per_step

    @property
    def num_notes(self) -> int:
        return len(self._items)

    def __len__(self) -> int:
        return self._n_batches

    def stats(self) -> dict:
        return json.loads(json.dumps(self._stats))

    def __iter__(self) -> Iterator[dict]:
        slots = None
        if self.num_workers > 0 and self.data_cfg.pixel_slots:
            slots = _PixelSlots.create(self.num_workers, self.batch_size, self._source.image_size)
        stream = _NotesStream(self._source, self._items, self.rank, self.world_size, self.batch_size,
                              self._n_batches, max(1, self.num_workers), slots)
        if self.num_workers > 0:
            it = _start_workers(stream, self.num_workers, self.data_cfg.worker_start_method)
        else:
            it = iter(stream)
        expected = 0
        for batch in it:
            meta = batch.pop("_meta")
            _pixels_from_slot(batch, meta, slots, self.pixel_transport)
            if self.normalize:
                batch["pixel_values"] = normalize_pixels(batch["pixel_values"], batch["image_present"])
            if meta["k"] != expected:
                raise RuntimeError(f"NotesLoader: got batch {meta['k']} where batch {expected} was due")
            expected += 1
            _merge_counts(self._stats, meta["counts"])
            self._stats["batches"] += 1
            for where, reason, message, action in meta["events"]:
                if (where, reason) not in self._logged:
                    self._logged.add((where, reason))
                    what = "embedded with a blank image" if action == "blanked" else "left out (is_dummy row)"
                    log.warning("bad note %s: %s [%s]; %s", where, message, reason, what)
            yield batch
