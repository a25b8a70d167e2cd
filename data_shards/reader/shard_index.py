"""The shard index: shard lists, manifest counts, and a header-only index of each tar shard.

Shards are local tar files in the WebDataset layout (`{key}.{member}`). Each process builds a
header-only index of a shard (member offsets, no payload read) and reads the members of a sample by
seeking (`ShardFiles`). Skipping samples (resume) therefore costs index arithmetic only: nothing is
read or decoded.
"""
from __future__ import annotations

import gc
import glob
import json
import mmap
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Optional, Union

import braceexpand

from notellm2.errors import UserError

# ----------------------------------------------------------------------------- shard lists

class ShardListError(UserError, ValueError):
    """A shard pattern or manifest that cannot be used (names the pattern or the file)."""


def expand_shards(shards: Union[str, Iterable[str]]) -> list[str]:
    """Brace patterns (`a-{000000..000003}.tar`), globs, or a list of either -> sorted unique paths.

    Raises FileNotFoundError naming the pattern when it matches nothing or names a missing file.
    """
    patterns = [shards] if isinstance(shards, str) else list(shards)
    if not patterns or any(not isinstance(p, str) or not p.strip() for p in patterns):
        raise ShardListError(f"shards: expected a pattern or a list of paths, got {shards!r}")
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
        raise ShardListError(f"shards: the same shard name in several folders: {dupes} (names identify shards in the state)")
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
        raise ShardListError(f"manifest: expected a path or a mapping with a 'shards' list, got {type(manifest).__name__}")
    counts = {}
    for source, data in sources:
        for i, entry in enumerate(data["shards"]):
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or \
                    not isinstance(entry.get("count"), int) or isinstance(entry.get("count"), bool) or entry["count"] < 0:
                raise ShardListError(f"{source}: shards[{i}]: needs 'name' (str) and 'count' (int >= 0), got {entry!r}")
            counts[os.path.basename(entry["name"])] = entry["count"]
    wanted = {os.path.basename(p) for p in paths}
    return {k: v for k, v in counts.items() if k in wanted}


def _read_manifest(path: str) -> dict:
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardListError(f"{path}: cannot read the shard manifest: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("shards"), list):
        raise ShardListError(f"{path}: expected a mapping with a 'shards' list")
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


class ShardFiles:
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


# ----------------------------------------------------------------------------- shard kinds

class ShardKindError(UserError, ValueError):
    """Shards of the wrong kind for the verb (pairs where notes are read, or the other way round)."""


def shard_kind(path: str) -> Optional[str]:
    """"pairs" (its first sample has q.json), "notes" (json) or None (empty, damaged, something else)."""
    ix = index_shard(path)
    if not ix.samples:
        return None
    members = {m[0] for m in ix.samples[0][1]}
    return "pairs" if "q.json" in members else "notes" if "json" in members else None


def check_shard_kind(paths: list[str], want: str, label: str, who: str) -> None:
    """Refuse, in one line naming `label` (the option or config key), a shard set whose first shard holds
    the other kind: a notes loader would find every pair sample unusable, a pair loader every note."""
    for path in paths:
        kind = shard_kind(path)
        if kind is None:
            continue  # empty or damaged: the loader counts it
        if kind != want:
            other = {"pairs": "pairs-<split>-*.tar", "notes": "notes-<split>-*.tar"}[want]
            raise ShardKindError(f"{label}: {path} holds {kind} (its samples have "
                                 f"{'q.json/t.json' if kind == 'pairs' else 'one json each'}); {who} reads "
                                 f"{want} shards ({other} of `notellm2 data write-shards`)")
        return
