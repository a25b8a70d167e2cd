"""The frozen-tower feature cache: the vision tower's outputs for every note, computed once.

The tower is frozen, so its outputs for a note's image never change. `notellm2 data cache-vision`
(launcher/train/vision_cache.py) runs it once over every note with an image in the given shards and writes a
folder; with `data.vision_cache: DIR` the loaders serve the stored features instead of decoding pixels
and `notellm2.modeling.vision.encode_images` returns them without running the tower (docs/reader.md, "The
vision cache").

    DIR/cache.json    what the cache holds (below), written last: a folder without it is not a cache
    DIR/ids.txt       one note id per line; line i is row i of the arrays
    DIR/tokens.npy    [O, N + 1, T, D]  the tower's tokens of orientation o for row i
    DIR/pooled.npy    [O, N + 1, Dp]    its pooled feature
    DIR/bad_images.json  {note_id: [reason, message]}: notes whose image member could not be used

O is 1 (`orientations: ["plain"]`) or 2 (`["plain", "flipped"]`: the horizontally mirrored image too,
what `data.random_flip` draws). Row N is the tower's output for a blank image (all zeros after CLIP
normalisation), which the live path feeds the tower for a row without an image; a batch's rows
without an image get it, so a batch's features are the live tower's row for row. The rows of a bad
image hold zeros and are never served: the loader treats such a note as the live path treats an image
that does not decode (the bad-sample policy). Values are float32 (exact) or float16 (half the bytes,
about 3 significant digits).

cache.json: format, tower_key (sha256 of the tower's config and weights, `notellm2.modeling.vision.tower_key`),
tower (the model.vision settings), image_size, orientations, dtype, num_notes (N, bad images
included), bad_images, num_tokens, token_dim, pooled_dim, blank_row (= N), max_image_pixels (the
decoder's limit, which decides what is a bad image), shards ({shard name: {size, samples, sha256}}: the
shards it covers, so that a loader can refuse an uncovered or changed shard before it starts).

The folder is written in a temporary folder beside it and renamed into place (`CacheWriter`), so a
cache is either complete or absent. `VisionCache` is the read side: picklable for the loader workers,
which memory-map the arrays (each worker reads only its rows; the page cache is shared).
"""
from __future__ import annotations

import json
import os
import shutil
import threading
from typing import Iterable, Optional

import numpy as np
import torch

from notellm2.errors import UserError
from notellm2.files import commit_dir

FORMAT = 1
ORIENTATIONS = ("plain", "flipped")
DTYPES = {"float32": np.float32, "float16": np.float16}
META, IDS, TOKENS, POOLED, BAD = "cache.json", "ids.txt", "tokens.npy", "pooled.npy", "bad_images.json"


class VisionCacheError(UserError, ValueError):
    """A vision cache that cannot serve this run: missing, partial, mismatched (names the cache)."""


# ----------------------------------------------------------------------------- read side

class VisionCache:
    """An opened cache folder (see the module docstring). `lookup` gives a note's row, `gather` a
    batch's features; checks raise `VisionCacheError` with what to do."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        meta_path = os.path.join(self.path, META)
        if not os.path.isdir(self.path):
            raise VisionCacheError(f"data.vision_cache: {path!r} does not exist; write it with "
                                   f"`notellm2 data cache-vision --config CONFIG --out {path}`")
        if not os.path.isfile(meta_path):
            raise VisionCacheError(f"data.vision_cache: {path!r} has no {META} (not a vision cache, or one whose "
                                   f"writing did not finish); write it again with `notellm2 data cache-vision`")
        try:
            with open(meta_path) as fh:
                self.meta = json.load(fh)
        except (OSError, json.JSONDecodeError) as e:
            raise VisionCacheError(f"data.vision_cache: cannot read {meta_path}: {e}") from None
        if self.meta.get("format") != FORMAT:
            raise VisionCacheError(f"data.vision_cache: {path!r} is format {self.meta.get('format')!r}; this code "
                                   f"reads format {FORMAT}: write it again with `notellm2 data cache-vision`")
        m = self.meta
        self.key: str = m["tower_key"]
        self.orientations: list = list(m["orientations"])
        self.image_size: int = int(m["image_size"])
        self.num_notes: int = int(m["num_notes"])
        self.blank_row: int = int(m["blank_row"])
        self.shards: dict = dict(m["shards"])
        with open(os.path.join(self.path, IDS)) as fh:
            ids = fh.read().split("\n")
        if ids and ids[-1] == "":
            ids.pop()
        if len(ids) != self.num_notes:
            raise VisionCacheError(f"data.vision_cache: {path!r} is partial: {IDS} lists {len(ids)} notes, "
                                   f"{META} says {self.num_notes}; write it again with `notellm2 data cache-vision`")
        self.rows = {nid: i for i, nid in enumerate(ids)}
        with open(os.path.join(self.path, BAD)) as fh:
            self.bad = {k: tuple(v) for k, v in json.load(fh).items()}
        want_t = (len(self.orientations), self.num_notes + 1, int(m["num_tokens"]), int(m["token_dim"]))
        want_p = (len(self.orientations), self.num_notes + 1, int(m["pooled_dim"]))
        for name, want in ((TOKENS, want_t), (POOLED, want_p)):
            arr = self._open(name)
            if tuple(arr.shape) != want or arr.dtype != np.dtype(m["dtype"]):
                raise VisionCacheError(f"data.vision_cache: {path!r}: {name} is {arr.dtype} {tuple(arr.shape)}, "
                                       f"{META} says {m['dtype']} {want} (partial or mixed cache); write it again")
        self._arrays: Optional[tuple] = None

    def _open(self, name: str) -> np.ndarray:
        try:
            return np.load(os.path.join(self.path, name), mmap_mode="r")
        except (OSError, ValueError) as e:
            raise VisionCacheError(f"data.vision_cache: cannot read {os.path.join(self.path, name)} ({e}): a partial "
                                   "cache; write it again with `notellm2 data cache-vision`") from None

    def __getstate__(self):  # the workers map the arrays themselves
        state = dict(self.__dict__)
        state["_arrays"] = None
        return state

    @property
    def arrays(self) -> tuple:
        if self._arrays is None:
            self._arrays = (self._open(TOKENS), self._open(POOLED))
        return self._arrays

    def describe(self) -> str:
        return f"vision cache {self.path} (tower key {self.key[:16]}, {self.num_notes} notes, {'+'.join(self.orientations)})"

    # -- checks (cheap: metadata and shard sizes, no feature read)
    def check_shards(self, paths: Iterable[str], setting: str) -> None:
        """Every shard of `paths` is one the cache was built from, unchanged (same size, and the same
        sha256 where both the cache and the shard's manifest.json have one)."""
        missing, changed = [], []
        manifest_sha = _manifest_sha256(paths)
        for p in paths:
            name = os.path.basename(p)
            entry = self.shards.get(name)
            if entry is None:
                missing.append(name)
                continue
            size = os.path.getsize(p)
            sha = manifest_sha.get(name)
            if entry.get("size") != size or (sha and entry.get("sha256") and sha != entry["sha256"]):
                changed.append(f"{name} ({entry.get('size')} -> {size} bytes)" if entry.get("size") != size
                               else f"{name} (sha256 differs from its manifest)")
        if missing:
            raise VisionCacheError(
                f"{setting}: the {self.describe()} is partial for these shards: it does not cover {len(missing)} of "
                f"them (first: {', '.join(missing[:3])}); it covers {len(self.shards)} shard(s). Write it again with "
                f"`notellm2 data cache-vision` over every shard set the run reads (train, val and notes shards)")
        if changed:
            raise VisionCacheError(f"{setting}: {len(changed)} shard(s) changed since the {self.describe()} was built "
                                   f"(first: {', '.join(changed[:3])}); write the cache again")

    def check_loader(self, paths: Iterable[str], image_size: int, flip: bool, max_image_pixels: int,
                     setting: str) -> None:
        """What a loader needs: its image size, the flipped orientation when it flips, the decoder's pixel
        limit (which decides the bad images), and its shards covered."""
        if image_size != self.image_size:
            raise VisionCacheError(f"{setting}: the {self.describe()} holds features of {self.image_size}px images; "
                                   f"the loader reads {image_size}px (model.vision.image_size): write the cache again")
        if flip and "flipped" not in self.orientations:
            raise VisionCacheError(f"data.random_flip: true, but the {self.describe()} holds only the plain "
                                   "orientation, and flipping changes the features; write it again with "
                                   "`notellm2 data cache-vision --flip`, or set data.random_flip: false")
        if max_image_pixels != int(self.meta["max_image_pixels"]):
            raise VisionCacheError(f"data.max_image_pixels: {max_image_pixels}, but the {self.describe()} was built with "
                                   f"{self.meta['max_image_pixels']} (the limit decides which images are bad); use the "
                                   "same value or write the cache again")
        self.check_shards(paths, setting)

    # -- serving
    def lookup(self, note_id: str, flip: bool, where: str) -> Optional[tuple]:
        """(orientation index, row) of `note_id`'s image, or None when the cache recorded it as a bad image
        (then `bad_reason` says why). A note the cache does not hold is an error: a partial cache."""
        row = self.rows.get(note_id)
        if row is None:
            raise VisionCacheError(f"{where}: the {self.describe()} has no features for note {note_id!r}, whose "
                                   "sample has an image: a partial cache; write it again with `notellm2 data "
                                   "cache-vision` over every shard set the run reads")
        if note_id in self.bad:
            return None
        if flip and "flipped" not in self.orientations:
            raise VisionCacheError(f"{where}: a flipped image was drawn but the {self.describe()} has no flipped "
                                   "orientation (`notellm2 data cache-vision --flip`)")
        return (1 if flip else 0), row

    def bad_reason(self, note_id: str) -> tuple:
        return self.bad[note_id]

    def gather(self, features: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens [N, T, D] and pooled [N, Dp] of a batch: `features[i]` is (orientation, row), or None for
        a row without an image (the blank image's features)."""
        tokens, pooled = self.arrays
        o = np.array([f[0] if f is not None else 0 for f in features], dtype=np.int64)
        r = np.array([f[1] if f is not None else self.blank_row for f in features], dtype=np.int64)
        return torch.from_numpy(np.ascontiguousarray(tokens[o, r])), torch.from_numpy(np.ascontiguousarray(pooled[o, r]))


def _manifest_sha256(paths: Iterable[str]) -> dict:
    """{shard name: sha256} from the manifest.json files next to `paths` (shards the writer wrote)."""
    out = {}
    for cand in sorted({os.path.join(os.path.dirname(p), "manifest.json") for p in paths}):
        try:
            with open(cand) as fh:
                data = json.load(fh)
            for entry in data.get("shards", []):
                sha = entry.get("sha256")
                if isinstance(sha, str) and len(sha) == 64:
                    out[os.path.basename(entry["name"])] = sha
        except (OSError, ValueError, AttributeError, KeyError, TypeError):
            continue
    return out


_OPENED: dict = {}
_LOCK = threading.Lock()


def open_cache(path: str) -> VisionCache:
    """The cache at `path`, opened once per process while its cache.json and ids.txt are unchanged (a
    PairLoader is built per epoch; reading ids.txt again each time would cost seconds at a million notes)."""
    stamp = []
    for name in (META, IDS):
        try:
            st = os.stat(os.path.join(os.path.abspath(path), name))
            stamp.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            stamp = None
            break
    with _LOCK:
        hit = _OPENED.get(os.path.abspath(path))
        if hit is not None and stamp is not None and hit[0] == stamp:
            return hit[1]
    cache = VisionCache(path)
    with _LOCK:
        _OPENED[os.path.abspath(path)] = (stamp, cache)
    return cache


def cache_for_loader(data_cfg, paths: list, image_size: int, flip: bool, who: str) -> Optional[VisionCache]:
    """The loader's cache (checked against its shards and settings), or None when data.vision_cache is unset."""
    if not getattr(data_cfg, "vision_cache", None):
        return None
    cache = open_cache(data_cfg.vision_cache)
    cache.check_loader(paths, image_size, flip, data_cfg.max_image_pixels, f"data.vision_cache ({who})")
    return cache


def manifest_entries(paths: Iterable[str]) -> dict:
    """The `shards` entry of cache.json for `paths`: {name: {size, samples, sha256}} (samples filled by the builder)."""
    sha = _manifest_sha256(paths)
    return {os.path.basename(p): {"size": os.path.getsize(p), "sha256": sha.get(os.path.basename(p)),
                                  "path": os.path.abspath(p)} for p in paths}


# ----------------------------------------------------------------------------- write side

class CacheWriter:
    """Writes a cache into `DIR.tmp-PID` beside `out` and renames it into place at `commit()`.

        w = CacheWriter(out, num_notes, orientations, num_tokens, token_dim, pooled_dim, "float32")
        w.put(orientation, rows, tokens, pooled)      # any order; every (orientation, row) once
        w.commit(ids, bad_images, meta)               # refuses when a row was never written
    """

    def __init__(self, out: str, num_notes: int, orientations: list, num_tokens: int, token_dim: int,
                 pooled_dim: int, dtype: str = "float32", overwrite: bool = False):
        if dtype not in DTYPES:
            raise VisionCacheError(f"--dtype: got {dtype!r}; allowed: {', '.join(DTYPES)}")
        bad = [o for o in orientations if o not in ORIENTATIONS]
        if bad or not orientations or orientations[0] != "plain":
            raise VisionCacheError(f"orientations: got {orientations}; allowed: ['plain'] or ['plain', 'flipped']")
        self.out = os.path.abspath(out)
        if os.path.exists(self.out) and not overwrite:
            raise VisionCacheError(f"--out: {out!r} exists; pass --overwrite to replace it")
        parent = os.path.dirname(self.out)
        os.makedirs(parent, exist_ok=True)
        self.tmp = f"{self.out}.tmp-{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        os.makedirs(self.tmp)
        self.num_notes, self.orientations, self.dtype = num_notes, list(orientations), dtype
        shape = (len(orientations), num_notes + 1)
        fmt = np.lib.format
        self.tokens = fmt.open_memmap(os.path.join(self.tmp, TOKENS), mode="w+", dtype=DTYPES[dtype],
                                      shape=(*shape, num_tokens, token_dim))
        self.pooled = fmt.open_memmap(os.path.join(self.tmp, POOLED), mode="w+", dtype=DTYPES[dtype],
                                      shape=(*shape, pooled_dim))
        self.written = np.zeros(shape, dtype=bool)
        self.dims = (num_tokens, token_dim, pooled_dim)

    def put(self, orientation: int, rows, tokens: np.ndarray, pooled: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        if tokens.shape != (len(rows), self.dims[0], self.dims[1]) or pooled.shape != (len(rows), self.dims[2]):
            raise VisionCacheError(f"vision cache: the tower returned tokens {tokens.shape} and pooled {pooled.shape} for "
                                   f"{len(rows)} images; expected [{len(rows)}, {self.dims[0]}, {self.dims[1]}] and "
                                   f"[{len(rows)}, {self.dims[2]}] (the tower's widths changed between images?)")
        self.tokens[orientation, rows] = tokens
        self.pooled[orientation, rows] = pooled
        self.written[orientation, rows] = True

    def skip(self, rows) -> None:
        """Rows that hold no features (bad images): zeros, never served."""
        self.written[:, np.asarray(rows, dtype=np.int64)] = True

    def commit(self, ids: list, bad_images: dict, meta: dict) -> str:
        if len(ids) != self.num_notes:
            raise VisionCacheError(f"vision cache: {len(ids)} ids for {self.num_notes} rows")
        if not self.written.all():
            o, r = np.argwhere(~self.written)[0]
            raise VisionCacheError(f"vision cache: row {r} of orientation {self.orientations[o]} was never written "
                                   f"({int((~self.written).sum())} missing); not committing a partial cache")
        self.tokens.flush()
        self.pooled.flush()
        del self.tokens, self.pooled
        with open(os.path.join(self.tmp, IDS), "w") as fh:
            fh.write("".join(f"{i}\n" for i in ids))
        with open(os.path.join(self.tmp, BAD), "w") as fh:
            json.dump({k: list(v) for k, v in bad_images.items()}, fh)
        full = {"format": FORMAT, "orientations": self.orientations, "dtype": self.dtype, "num_notes": self.num_notes,
                "blank_row": self.num_notes, "num_tokens": self.dims[0], "token_dim": self.dims[1],
                "pooled_dim": self.dims[2], "bad_images": len(bad_images), **meta}
        with open(os.path.join(self.tmp, META), "w") as fh:
            json.dump(full, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        old = None
        if os.path.exists(self.out):
            old = f"{self.out}.old-{os.getpid()}"
            os.rename(self.out, old)
        commit_dir(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        with _LOCK:
            _OPENED.pop(self.out, None)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def cache_bytes(num_notes: int, orientations: int, num_tokens: int, token_dim: int, pooled_dim: int,
                bytes_per_value: int) -> int:
    """The size of the feature arrays: N x O x (T x D + Dp) x bytes (docs/plan.md), blank row left out."""
    return num_notes * orientations * (num_tokens * token_dim + pooled_dim) * bytes_per_value
