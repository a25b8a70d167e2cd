"""Notes without pairs: a catalog of new or edited notes -> notes shards (`notellm2 data write-notes`).

A brand-new note has no behaviour yet, so no mined pair: `write-shards` cannot take it. This writer
takes a catalog alone and writes notes shards (`notes-catalog-000000.tar`, ...) in the layout of
`write-shards`' notes shards (docs/data.md): one sample per note, `{key}.json` and, for a note with a
usable image, `{key}.jpg`, re-encoded with the same fixed settings. So a note whose text and image
did not change gets the same bytes, hence the same content hash
(notellm2.data_shards.reader.content_hash), as in the shards it was first embedded from, provided
`--image-size` and `--jpeg-quality` are the same.

Deletions travel with the shards, for `notellm2 embed --base` to apply (docs/new_notes.md):
- `deleted`: a file of note ids, one a line (blank lines and `#` comments skipped), written to
  `deleted.txt`; an id that is also in the catalog is refused (a note cannot be both);
- `full_catalog`: today's full catalog (its ids only are read), written to `catalog_ids.txt`: every
  note of the base set that is not in it is deleted (the difference against the full catalog). Every
  note of `catalog` must be in it.

The notes are written in note-id order; a note whose image is missing or does not decode is written
without one (counted under `problems.bad_image`). `manifest.json` is written last: its presence marks
a complete set. The writer refuses (`ShardWriteError`, one line) before touching `out_dir`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Optional

from notellm2.data_shards.catalog.notes import (CatalogError, _maybe_pool, default_workers, index_catalog,
                                                iter_catalog, load_catalog, ordered_imap)
from notellm2.data_shards.problems import Problem
from notellm2.data_shards.writing.shards import (MANIFEST, ShardSettings, ShardWriteError, _encode_task,
                                                 _earlier_set, _json_bytes, _prepare_out_dir, _ShardSink, shard_pattern,
                                                 write_manifest)
from notellm2.files import atomic_write_text, sha256_file

log = logging.getLogger("notellm2.data")

NOTES_FORMAT = "notellm2-notes"
FORMAT_VERSION = 1
SPLIT = "catalog"  # the shards' names: notes-catalog-000000.tar
DELETED_FILE = "deleted.txt"
CATALOG_IDS_FILE = "catalog_ids.txt"
DELETION_KINDS = ("none", "list", "full_catalog")


def read_id_list(path: str) -> list[str]:
    """Note ids, one a line; blank lines and `#` comments skipped; a repeated id is refused."""
    try:
        with open(path, encoding="utf-8") as fh:
            ids = [line.strip() for line in fh if line.strip() and not line.lstrip().startswith("#")]
    except FileNotFoundError:
        raise ShardWriteError(f"{path}: the list of deleted note ids does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ShardWriteError(f"{path}: cannot read the list of note ids ({e})") from None
    seen: set[str] = set()
    dup = [n for n in ids if n in seen or seen.add(n)]
    if dup:
        raise ShardWriteError(f"{path}: note id {dup[0]!r} is listed twice ({len(dup)} repeats)")
    return ids


def catalog_ids(path: str, image_root: Optional[str] = None, fmt: Optional[str] = None) -> list[str]:
    """The note ids of a catalog file (only the ids are read; a malformed line is refused)."""
    ids = []
    try:
        for _, item in iter_catalog(path, image_root, fmt):
            if isinstance(item, CatalogError):
                raise item
            ids.append(item.note_id)
    except CatalogError as e:
        raise ShardWriteError(str(e)) from None
    seen: set[str] = set()
    dup = [n for n in ids if n in seen or seen.add(n)]
    if dup:
        raise ShardWriteError(f"{path}: note id {dup[0]!r} appears twice in the full catalog")
    return ids


def _write_ids(path: str, ids: list[str]) -> dict:
    atomic_write_text(path, "".join(f"{n}\n" for n in ids))
    return {"file": os.path.basename(path), "count": len(ids), "sha256": sha256_file(path)}


def write_notes(catalog: str, out_dir: str, image_root: Optional[str] = None, catalog_format: Optional[str] = None,
                settings: Optional[ShardSettings] = None, deleted: Optional[str] = None,
                full_catalog: Optional[str] = None, workers: Optional[int] = None, overwrite: bool = False,
                progress: bool = False) -> dict:
    """Write the notes of `catalog` as notes shards in `out_dir`, with the deletions; return the manifest."""
    from tqdm import tqdm

    st = settings or ShardSettings()
    st.check()  # sizes and quality; its splits, seed and bad-image policy do not apply here (drop_image)
    if deleted and full_catalog:
        raise ShardWriteError("give the deletions one way: --deleted (a list of ids) or --full-catalog "
                              "(today's full catalog), not both")
    workers = default_workers() if workers is None else max(1, int(workers))
    try:
        notes = index_catalog(load_catalog(catalog, image_root, catalog_format), source=catalog)
    except CatalogError as e:
        raise ShardWriteError(str(e)) from None
    deletions: dict = {"kind": "none"}
    gone: list[str] = []
    full: list[str] = []
    if deleted:
        gone = read_id_list(deleted)
        both = [n for n in gone if n in notes]
        if both:
            raise ShardWriteError(f"{deleted}: {len(both)} deleted ids are also notes of {catalog} (first: "
                                  f"{', '.join(both[:3])}); a note is either new/edited or deleted")
    if full_catalog:
        full = catalog_ids(full_catalog, image_root, catalog_format)
        listed = set(full)
        absent = [n for n in notes if n not in listed]
        if absent:
            raise ShardWriteError(f"{full_catalog}: {len(absent)} notes of {catalog} are not in the full catalog "
                                  f"(first: {', '.join(absent[:3])}); the full catalog must hold every note")
    if _earlier_set(out_dir) is not None and not overwrite:
        raise ShardWriteError(f"{out_dir}: holds a complete shard set (manifest.json) from an earlier run; "
                              f"pass --overwrite to replace it, or choose another directory")
    old_shards, _created = _prepare_out_dir(out_dir)
    for stale in (DELETED_FILE, CATALOG_IDS_FILE):
        if os.path.exists(os.path.join(out_dir, stale)):
            os.remove(os.path.join(out_dir, stale))

    order = sorted(notes)
    bad = Problem("bad_image")
    sink = _ShardSink(out_dir, "notes", SPLIT, st.shard_size)
    n_img = 0
    try:
        tasks = [(notes[n].image_path, st.image_size, st.jpeg_quality, st.max_image_pixels) for n in order
                 if notes[n].image_path is not None]
        with _maybe_pool(min(workers, max(1, len(tasks)))) as pool:
            encoded = iter(ordered_imap(pool, _encode_task, tasks, chunksize=4))
            for i, nid in enumerate(tqdm(order, desc="notes", unit=" notes", disable=not progress)):
                key = f"{i:09d}"
                members = [(f"{key}.json", _json_bytes(notes[nid].text_json()))]
                if notes[nid].image_path is not None:
                    _, jpeg, reason = next(encoded)
                    if jpeg is None:
                        bad.add(nid, reason or "")
                    else:
                        members.append((f"{key}.jpg", jpeg))
                        n_img += 1
                sink.add(members)
        sink.finish_shard()
    except BaseException:
        sink.abort()
        raise
    if bad.count:
        log.warning("write-notes: %d notes with a bad image, written without it (first: %s)", bad.count,
                    ", ".join(bad.first))
    if deleted:
        deletions = {"kind": "list", **_write_ids(os.path.join(out_dir, DELETED_FILE), gone)}
    elif full_catalog:
        deletions = {"kind": "full_catalog", **_write_ids(os.path.join(out_dir, CATALOG_IDS_FILE), full)}
    new_names = {e["name"] for e in sink.entries}
    for name in old_shards:
        if name not in new_names:
            os.remove(os.path.join(out_dir, name))
    manifest = {
        "format": NOTES_FORMAT, "version": FORMAT_VERSION,
        "settings": {"shard_size": st.shard_size, "image_size": st.image_size, "jpeg_quality": st.jpeg_quality,
                     "max_image_pixels": st.max_image_pixels},
        "sources": {"catalog": {"path": catalog, "sha256": sha256_file(catalog), "notes": len(notes)},
                    "deleted": {"path": deleted, "sha256": sha256_file(deleted)} if deleted else None,
                    "full_catalog": ({"path": full_catalog, "sha256": sha256_file(full_catalog)}
                                     if full_catalog else None)},
        "counts": {"notes_written": len(order), "notes_with_image": n_img},
        "deletions": deletions,
        "problems": {"bad_image": bad.to_dict()},
        "patterns": {f"notes-{SPLIT}": shard_pattern([e["name"] for e in sink.entries])},
        "shards": sink.entries,
    }
    write_manifest(out_dir, manifest)
    return manifest


@dataclasses.dataclass
class NotesSet:
    """A `write-notes` folder as `notellm2 embed --base` reads it."""
    folder: str
    shards: list[str]  # paths, in order
    deletion_kind: str  # none | list | full_catalog
    ids: list[str]  # the deleted ids (list) or today's full catalog (full_catalog)


def read_notes_set(folder: str) -> NotesSet:
    """A finished `write-notes` folder: its shards and its deletions (refused in one line otherwise)."""
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path, encoding="utf-8") as fh:
            manifest = json.load(fh)
    except FileNotFoundError:
        raise ShardWriteError(f"{path}: missing (not a finished `notellm2 data write-notes` folder)") from None
    except (OSError, ValueError) as e:
        raise ShardWriteError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != NOTES_FORMAT:
        raise ShardWriteError(f"{path}: not a `notellm2 data write-notes` manifest (format "
                              f"{manifest.get('format') if isinstance(manifest, dict) else None!r})")
    shards = [os.path.join(folder, e["name"]) for e in manifest.get("shards", [])]
    deletions = manifest.get("deletions") or {"kind": "none"}
    kind = deletions.get("kind")
    if kind not in DELETION_KINDS:
        raise ShardWriteError(f"{path}: deletions.kind {kind!r}; allowed {', '.join(DELETION_KINDS)}")
    ids: list[str] = []
    if kind != "none":
        ids_path = os.path.join(folder, deletions["file"])
        if not os.path.isfile(ids_path) or sha256_file(ids_path) != deletions.get("sha256"):
            raise ShardWriteError(f"{ids_path}: missing or not the file the manifest names")
        with open(ids_path, encoding="utf-8") as fh:
            ids = [line.rstrip("\n") for line in fh if line.strip()]
    return NotesSet(folder, shards, kind, ids)


def copy_notes(locations: list[tuple], out_dir: str, shard_size: int = 1000, split: str = "delta") -> dict:
    """Copy the notes at `locations` ((shard path, sample) of notellm2.data_shards.reader.content_hash)
    into new notes shards `notes-{split}-000000.tar`, ... in `out_dir`, in the given order, their
    members' bytes unchanged (so their content hashes too); returns the manifest (`write-notes`
    format, no deletions). `notellm2 embed --base` embeds such a subset of a notes set."""
    from notellm2.data_shards.reader.samples import read_members
    from notellm2.data_shards.reader.shard_index import ShardFiles

    os.makedirs(out_dir, exist_ok=True)
    sink = _ShardSink(out_dir, "notes", split, shard_size)
    files = ShardFiles()
    try:
        for i, (path, sample) in enumerate(locations):
            key = f"{i:09d}"
            raw = read_members(files, path, sample, [m[0] for m in sample[1]])
            sink.add([(f"{key}.{ext}", data) for ext, data in raw.items()])
        sink.finish_shard()
    except BaseException:
        sink.abort()
        raise
    finally:
        files.close()
    manifest = {"format": NOTES_FORMAT, "version": FORMAT_VERSION, "counts": {"notes_written": len(locations)},
                "deletions": {"kind": "none"}, "shards": sink.entries,
                "patterns": {f"notes-{split}": shard_pattern([e["name"] for e in sink.entries])}}
    write_manifest(out_dir, manifest)
    return manifest
