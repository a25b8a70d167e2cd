"""Pairs + catalog -> WebDataset tar shards (`notellm2 data write-shards`). Layout in docs/data.md.

Guarantees:
- Deterministic: the same pairs, catalog, images and settings give byte-identical shards and
  manifest, whatever the row order of pairs.parquet and whatever the number of workers (pairs are
  de-duplicated and sorted, then permuted by a generator seeded from (seed, split); tar headers
  have fixed mtime/uid/gid/owner names; JPEG encoding settings are fixed).
- Atomic: each shard is written under a hidden temporary name, flushed to disk and renamed;
  ``manifest.json`` is written last, so its presence marks a complete shard set.
- With a train split, ``note_stats.parquet`` beside the shards holds each note's share of the
  training-pair appearances and its known related notes (data_shards/writing/note_stats.py; the manifest's
  ``note_stats`` entry), for ``loss.logq_correction`` and ``loss.mask_known_positives``.
- Each distinct image is decoded and re-encoded once (in a process pool), however many pairs the
  note appears in; the encoded bytes wait in a temporary spool file, not in memory.

Bad-pair policy (counted in the manifest, first ids logged):
- a pair whose query or target note is not in the catalog is skipped (``missing_note``);
- a pair of a note with itself is skipped (``self_pair``); a repeated (query, target) in a split
  is written once, with its highest score (``duplicate_pair``);
- a note whose image file is missing or does not decode (``bad_image``): with the default policy
  ``drop_image`` the note is written without image members (as a note that has no image);
  with ``skip_pair`` every pair that involves it is skipped instead.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import tarfile
import zlib
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np

from notellm2.errors import UserError
from notellm2.data_shards.mining import pairs_file
from notellm2.data_shards.writing.note_stats import NOTE_STATS_FILE, compute_note_stats, write_note_stats
from notellm2.data_shards.catalog.notes import CatalogError, _maybe_pool, default_workers, index_catalog, load_catalog, ordered_imap
from notellm2.files import atomic_write, atomic_write_text, commit_file, sha256_file, temporary_name
from notellm2.data_shards.config import MAX_IMAGE_PIXELS
from notellm2.data_shards.problems import Problem
from notellm2.outputs import check_folder_output, make_folder, remove_made, request_differences, reuse_finished

log = logging.getLogger("notellm2.data")

SPLITS = ("train", "val", "test")
BAD_IMAGE_POLICIES = ("drop_image", "skip_pair")
MANIFEST = "manifest.json"
PROBLEM_LOG = "problems.jsonl"  # every missing note and bad image of a run (the manifest keeps the first few)
FORMAT_VERSION = 1
_SHARD_RE = re.compile(r"^(pairs|notes)-[A-Za-z0-9_]+-\d{6}\.tar$")
# Temporary files of a run (a shard or the manifest being written, the image spool).
_TMP_RE = re.compile(r"^\.((pairs|notes)-[A-Za-z0-9_]+-\d{6}\.tar\.tmp|manifest\.json\.tmp|note_stats\.parquet\.tmp"
                     r"|problems\.jsonl\.tmp"
                     r"|images\.spool)-\d+$")


class ShardWriteError(UserError, ValueError):
    """Inputs the writer refuses (bad pairs file, duplicate catalog ids, an occupied out dir)."""


@dataclass
class ShardSettings:
    shard_size: int = 1000  # samples per shard (the last shard of a set may hold fewer)
    image_size: int = 256  # images larger than this are scaled down to this shorter side
    jpeg_quality: int = 90
    seed: int = 0
    splits: tuple = SPLITS
    bad_image_policy: str = "drop_image"
    max_image_pixels: int = MAX_IMAGE_PIXELS  # larger source images are treated as bad (decompression bombs)

    def check(self) -> None:
        if self.shard_size <= 0:
            raise ShardWriteError(f"shard_size: got {self.shard_size}; allowed: an integer > 0")
        if self.image_size <= 0:
            raise ShardWriteError(f"image_size: got {self.image_size}; allowed: an integer > 0")
        if not 1 <= self.jpeg_quality <= 95:
            raise ShardWriteError(f"jpeg_quality: got {self.jpeg_quality}; allowed: 1..95")
        if self.bad_image_policy not in BAD_IMAGE_POLICIES:
            raise ShardWriteError(f"bad_image_policy: got {self.bad_image_policy!r}; allowed: {', '.join(BAD_IMAGE_POLICIES)}")
        if not self.splits:
            raise ShardWriteError("splits: empty; allowed: a non-empty subset of train, val, test")
        for s in self.splits:
            if s not in SPLITS:
                raise ShardWriteError(f"splits: got {s!r}; allowed: {', '.join(SPLITS)}")


# ----------------------------------------------------------------------------- images

def bounded_size(w: int, h: int, image_size: int) -> tuple[int, int]:
    """Target size: shorter side at most `image_size`, longer side at most 4 x `image_size`;
    never enlarged; aspect ratio kept."""
    scale = min(1.0, image_size / min(w, h), 4 * image_size / max(w, h))
    if scale >= 1.0:
        return w, h
    return max(1, round(w * scale)), max(1, round(h * scale))


def reencode_image(data: bytes, image_size: int = 256, quality: int = 90,
                   max_pixels: int = MAX_IMAGE_PIXELS) -> bytes:
    """Decode (EXIF orientation applied, alpha flattened on white), bound the size, encode as a
    baseline JPEG with fixed settings. Raises `notellm2.data_shards.images.BadImage`."""
    from PIL import Image

    from notellm2.data_shards.images import open_image

    img = open_image(data, max_pixels=max_pixels)
    size = bounded_size(*img.size, image_size)
    if size != img.size:
        # reducing_gap: a fast box reduction first, bicubic for the last factor <= 2 (large sources).
        img = img.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, optimize=False, progressive=False, subsampling="4:2:0")
    return buf.getvalue()


def _encode_task(args):
    """Worker: (path, image_size, quality, max_pixels) -> (raw sha256 | None, jpeg | None, reason | None)."""
    from notellm2.data_shards.images import BadImage

    path, image_size, quality, max_pixels = args
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as e:
        return None, None, f"cannot read {path}: {e.strerror or e}"
    digest = hashlib.sha256(raw).hexdigest()
    try:
        return digest, reencode_image(raw, image_size, quality, max_pixels), None
    except BadImage as e:
        return digest, None, str(e)


class _ImageSpool:
    """Append-only temp file of encoded images: note_id -> (offset, length)."""

    def __init__(self, path: str):
        self.path = path
        self.fh = open(path, "w+b")
        self.index: dict[str, tuple[int, int]] = {}

    def put(self, note_id: str, data: bytes) -> None:
        self.fh.seek(0, os.SEEK_END)
        self.index[note_id] = (self.fh.tell(), len(data))
        self.fh.write(data)

    def get(self, note_id: str) -> Optional[bytes]:
        loc = self.index.get(note_id)
        if loc is None:
            return None
        self.fh.seek(loc[0])
        return self.fh.read(loc[1])

    def close(self) -> None:
        self.fh.close()
        if os.path.exists(self.path):
            os.remove(self.path)


# ----------------------------------------------------------------------------- tar shards

def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info, io.BytesIO(data)


def _json_bytes(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8")


class _ShardSink:
    """Writes samples into `{kind}-{split}-{i:06d}.tar`, `shard_size` samples per shard, each shard
    under a temporary name until it is complete."""

    def __init__(self, out_dir: str, kind: str, split: str, shard_size: int):
        self.out_dir, self.kind, self.split, self.shard_size = out_dir, kind, split, shard_size
        self.entries: list[dict] = []
        self.tar: Optional[tarfile.TarFile] = None
        self.tmp = self.name = ""
        self.count = 0

    def add(self, members: list[tuple[str, bytes]]) -> None:
        if self.tar is None:
            self.name = f"{self.kind}-{self.split}-{len(self.entries):06d}.tar"
            self.tmp = temporary_name(os.path.join(self.out_dir, self.name))
            self.tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)
            self.count = 0
        for name, data in members:
            self.tar.addfile(*_member(name, data))
        self.count += 1
        if self.count >= self.shard_size:
            self.finish_shard()

    def finish_shard(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        final = os.path.join(self.out_dir, self.name)
        commit_file(self.tmp, final)
        self.entries.append({"name": self.name, "kind": self.kind, "split": self.split, "count": self.count,
                             "bytes": os.path.getsize(final), "sha256": sha256_file(final)})
        self.tar = None

    def abort(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.tar = None
            if os.path.exists(self.tmp):
                os.remove(self.tmp)


def shard_pattern(names: Sequence[str]) -> str:
    """Brace pattern for a contiguous shard list: pairs-train-{000000..000003}.tar ("" if none)."""
    if not names:
        return ""
    if len(names) == 1:
        return names[0]
    stem = names[0][:-len("000000.tar")]
    return f"{stem}{{{names[0][-10:-4]}..{names[-1][-10:-4]}}}.tar"


# ----------------------------------------------------------------------------- pairs

def read_pairs(pairs_dir: str):
    """Read and check ``pairs_dir/pairs.parquet`` (notellm2.data_shards.mining.pairs_file); returns a pandas DataFrame."""
    try:
        return pairs_file.read_pairs(pairs_dir)
    except (FileNotFoundError, ValueError) as e:
        raise ShardWriteError(str(e)) from None


def read_split_notes(pairs_dir: str) -> Optional[dict[str, list[str]]]:
    """split -> sorted note ids from ``note_split.parquet`` beside the pairs (None when absent:
    pairs from elsewhere; the notes shards then hold the notes of each split's pairs)."""
    if not pairs_file.has_note_split(pairs_dir):
        return None
    try:
        df = pairs_file.read_note_split(pairs_dir)
    except (FileNotFoundError, ValueError) as e:
        raise ShardWriteError(str(e)) from None
    return {s: sorted(df.loc[df["split"] == s, "note_id"]) for s in SPLITS}


def _split_rng(seed: int, split: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(split.encode())]))


# ----------------------------------------------------------------------------- main entry

def _prepare_out_dir(out_dir: str) -> tuple[list[str], Optional[str]]:
    """Create `out_dir`; return (the names of shards of an earlier run, the topmost folder this call
    created, None when it existed: notellm2.outputs.make_folder). Those shards the new run does not
    rewrite are removed once it is done; shards without a manifest are the remains of an interrupted
    run and are replaced. The caller has already decided about a complete earlier set (`_earlier_set`)."""
    created = make_folder(out_dir)
    names = sorted(os.listdir(out_dir))
    for n in names:
        if _TMP_RE.match(n):  # left by an interrupted run: never a final name
            os.remove(os.path.join(out_dir, n))
    old = [n for n in names if _SHARD_RE.match(n)]
    has_manifest = MANIFEST in names
    if old and not has_manifest:
        log.info("write-shards: %s holds %d shards but no manifest (an interrupted run); replacing them",
                 out_dir, len(old))
    if has_manifest:
        os.remove(os.path.join(out_dir, MANIFEST))  # the set is incomplete until the new manifest lands
    for name in (NOTE_STATS_FILE, PROBLEM_LOG):  # an earlier run's: rewritten below when this run has them
        if name in names:
            os.remove(os.path.join(out_dir, name))
    return old, created


def _earlier_set(out_dir: str) -> Optional[dict]:
    """The manifest of a complete shard set in `out_dir` (None: none there). A manifest that cannot be
    read is refused: the folder holds something else, or a damaged set that --overwrite replaces."""
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            manifest = json.load(fh)
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        return {"unreadable": f"{type(e).__name__}: {e}"}
    return manifest


def _request(version, settings: dict, sources: dict) -> dict:
    """What decides a shard set's bytes: the settings and the content of every input (not their paths;
    not the mining manifest either, whose timings differ between two minings of the same pairs)."""
    return {"version": version, "settings": settings,
            "sources": {k: ({kk: vv for kk, vv in v.items() if kk != "path"} if isinstance(v, dict) else v)
                        for k, v in (sources or {}).items() if k != "mining_manifest"}}


def _image_digest(notes: dict, with_image: list[str]) -> str:
    """sha256 over (note id, sha256 of the image file's bytes) of `with_image`, in order: the manifest's
    `sources.images.sha256` (a file that cannot be read counts as None, as the writer records it)."""
    h = hashlib.sha256()
    for nid in with_image:
        try:
            raw = sha256_file(notes[nid].image_path)
        except OSError:
            raw = None
        h.update(f"{nid}\t{raw}\n".encode())
    return h.hexdigest()


def write_shards(pairs_dir: str, catalog: str, out_dir: str, image_root: Optional[str] = None,
                 catalog_format: Optional[str] = None, settings: Optional[ShardSettings] = None,
                 workers: Optional[int] = None, overwrite: bool = False, progress: bool = False) -> dict:
    """Write pair shards and notes shards for the selected splits; return the manifest dict.

    `workers` processes re-encode images (default: the cores this process may use; 1 runs in
    this process). Raises `ShardWriteError` on input it refuses, before touching `out_dir`: a pairs
    file or catalog it cannot read, inputs that give no pair to write at all, an `out_dir` that is a
    file, or one that holds a complete set of other inputs or settings (unless `overwrite`). When
    `out_dir` holds a complete set of the same inputs and settings, that set's manifest is returned
    (with "unchanged": True) and nothing is written.
    """
    from tqdm import tqdm

    st = dataclasses.replace(settings or ShardSettings())
    if isinstance(st.splits, str):
        st.splits = tuple(s.strip() for s in st.splits.split(",") if s.strip())
    st.splits = tuple(st.splits)
    st.check()
    workers = default_workers() if workers is None else max(1, int(workers))
    check_folder_output(out_dir)

    pairs_path = pairs_file.pairs_path(pairs_dir)
    df = read_pairs(pairs_dir)
    split_notes_of = read_split_notes(pairs_dir)
    try:
        notes = index_catalog(load_catalog(catalog, image_root, catalog_format), source=catalog)
    except CatalogError as e:
        raise ShardWriteError(str(e)) from None

    problems = {k: Problem(k, keep_all=True) for k in ("missing_note", "bad_image")}
    counts: dict[str, dict] = {}
    split_pairs: dict[str, list[tuple[str, str, float]]] = {}
    missing_seen: set[str] = set()
    for split in st.splits:
        part = df[df["split"] == split]
        c = counts[split] = {"pairs_in": int(len(part)), "self_pairs": 0, "duplicate_pairs": 0,
                             "missing_note_pairs": 0, "bad_image_pairs": 0}
        part = part.sort_values(["query_id", "target_id", "score"], ascending=[True, True, False], kind="mergesort")
        selfp = part["query_id"] == part["target_id"]
        c["self_pairs"] = int(selfp.sum())
        part = part[~selfp]
        dedup = part.drop_duplicates(["query_id", "target_id"], keep="first")
        c["duplicate_pairs"] = int(len(part) - len(dedup))
        kept = []
        for q, t, s in zip(dedup["query_id"], dedup["target_id"], dedup["score"]):
            absent = [x for x in (q, t) if x not in notes]
            if absent:
                c["missing_note_pairs"] += 1
                for x in absent:
                    if x not in missing_seen:
                        missing_seen.add(x)
                        problems["missing_note"].add(x, f"in {split} pair {q} -> {t}")
                continue
            kept.append((q, t, float(s)))
        split_pairs[split] = kept
    _refuse_nothing_to_write(split_pairs, counts, problems, pairs_path, catalog)

    # The notes of each split: every note the mining assigned to it (note_split.parquet), also
    # those in no pair, when the file is there; else the notes of the split's pairs.
    split_notes: dict[str, list[str]] = {}
    for split in st.splits:
        if split_notes_of is None:
            split_notes[split] = sorted({x for q, t, _ in split_pairs[split] for x in (q, t)})
            continue
        listed = split_notes_of[split]
        split_notes[split] = [x for x in listed if x in notes]
        counts[split]["split_notes_missing_from_catalog"] = len(listed) - len(split_notes[split])
        for x in listed:
            if x not in notes and x not in missing_seen:
                missing_seen.add(x)
                problems["missing_note"].add(x, f"in note_split.parquet ({split})")

    needed = sorted({x for pairs in split_pairs.values() for q, t, _ in pairs for x in (q, t)}
                    | {x for ids in split_notes.values() for x in ids})
    with_image = [nid for nid in needed if notes[nid].image_path is not None]
    mining_manifest = os.path.join(os.path.dirname(pairs_path), "mining_manifest.json")
    note_split_path = os.path.join(os.path.dirname(pairs_path), pairs_file.NOTE_SPLIT_FILE)
    settings_dict = {**asdict(st), "splits": list(st.splits)}
    sources = {
        "pairs": {"path": pairs_path, "sha256": sha256_file(pairs_path)},
        "mining_manifest": ({"path": mining_manifest, "sha256": sha256_file(mining_manifest)}
                            if os.path.isfile(mining_manifest) else None),
        "note_split": ({"path": note_split_path, "sha256": sha256_file(note_split_path)}
                       if split_notes_of is not None else None),
        "catalog": {"path": catalog, "sha256": sha256_file(catalog), "notes": len(notes)},
    }
    earlier = _earlier_set(out_dir)
    if earlier is not None:
        recorded = ({"manifest.json": f"unreadable ({earlier['unreadable']})"} if "unreadable" in earlier
                    else _request(earlier.get("version"), earlier.get("settings"), earlier.get("sources")))
        request = _request(FORMAT_VERSION, settings_dict, sources)
        if not request_differences({k: v for k, v in recorded.items() if k != "sources"} | {
                "sources": {k: v for k, v in (recorded.get("sources") or {}).items() if k != "images"}}, request):
            # all else matches: the images are hashed now (a pass over the files) and the shards checked
            request["sources"]["images"] = {"read": len(with_image), "sha256": _image_digest(notes, with_image)}
            if not request_differences(recorded, request) and verify_shards(out_dir):
                # the same request, but its shards were changed since (`notellm2 data validate --shards`)
                recorded, request = {**recorded, "shards": "damaged"}, {**request, "shards": "intact"}
        else:
            request["sources"]["images"] = (recorded.get("sources") or {}).get("images")
        if reuse_finished(out_dir, recorded, request, overwrite, "a complete shard set (manifest.json)",
                          error=ShardWriteError):
            log.info("write-shards: %s already holds this shard set (same inputs and settings): nothing to do",
                     out_dir)
            return {**earlier, "unchanged": True}
    old_shards, created = _prepare_out_dir(out_dir)

    note_stats = None
    # Encode every distinct image once, in a fixed order (sorted note ids).
    spool = _ImageSpool(os.path.join(out_dir, f".images.spool-{os.getpid()}"))
    bad_images: set[str] = set()
    image_digest = hashlib.sha256()
    sinks: list[_ShardSink] = []
    try:
        tasks = [(notes[nid].image_path, st.image_size, st.jpeg_quality, st.max_image_pixels) for nid in with_image]
        with _maybe_pool(min(workers, max(1, len(tasks)))) as pool:
            results = ordered_imap(pool, _encode_task, tasks, chunksize=4)
            for nid, (raw_sha, jpeg, reason) in tqdm(zip(with_image, results), total=len(tasks), unit=" img",
                                                     desc="re-encoding images", disable=not progress):
                image_digest.update(f"{nid}\t{raw_sha}\n".encode())
                if jpeg is None:
                    bad_images.add(nid)
                    problems["bad_image"].add(nid, reason or "")
                else:
                    spool.put(nid, jpeg)
        for name, p in problems.items():
            if p.count:
                log.warning("write-shards: %d %s (first: %s)", p.count, name, ", ".join(p.first))
        if st.bad_image_policy == "skip_pair":
            for split in st.splits:
                before = len(split_pairs[split])
                split_pairs[split] = [p for p in split_pairs[split] if p[0] not in bad_images and p[1] not in bad_images]
                counts[split]["bad_image_pairs"] = before - len(split_pairs[split])
            _refuse_nothing_to_write(split_pairs, counts, problems, pairs_path, catalog)
        else:
            for split in st.splits:
                counts[split]["bad_image_pairs"] = sum(1 for q, t, _ in split_pairs[split]
                                                       if q in bad_images or t in bad_images)

        for split in st.splits:
            pairs = split_pairs[split]
            order = _split_rng(st.seed, split).permutation(len(pairs))
            pairs = [pairs[i] for i in order]

            sink = _ShardSink(out_dir, "pairs", split, st.shard_size)
            sinks.append(sink)
            for i, (q, t, s) in enumerate(tqdm(pairs, desc=f"pairs-{split}", unit=" pairs", disable=not progress)):
                key = f"{i:09d}"
                members = [(f"{key}.pair.json", _json_bytes({"query_id": q, "target_id": t, "score": s}))]
                for role, nid in (("q", q), ("t", t)):
                    members.append((f"{key}.{role}.json", _json_bytes(notes[nid].text_json())))
                    img = spool.get(nid)
                    if img is not None:
                        members.append((f"{key}.{role}.jpg", img))
                sink.add(members)
            sink.finish_shard()
            if split == "train":  # the per-note statistics of the training pairs as written (data_shards/writing/note_stats.py)
                note_stats = write_note_stats(out_dir, compute_note_stats(pairs), len(pairs))

            if split_notes_of is None:  # pairs dropped for bad images leave the notes shards too
                split_notes[split] = sorted({x for q, t, _ in pairs for x in (q, t)})
            nsink = _ShardSink(out_dir, "notes", split, st.shard_size)
            sinks.append(nsink)
            n_img = 0
            for i, nid in enumerate(tqdm(split_notes[split], desc=f"notes-{split}", unit=" notes", disable=not progress)):
                key = f"{i:09d}"
                members = [(f"{key}.json", _json_bytes(notes[nid].text_json()))]
                img = spool.get(nid)
                if img is not None:
                    members.append((f"{key}.jpg", img))
                    n_img += 1
                nsink.add(members)
            nsink.finish_shard()
            counts[split].update(pairs_written=len(pairs), notes_written=len(split_notes[split]),
                                  notes_with_image=n_img)
            if not pairs:
                log.warning("write-shards: split %s has no pairs to write", split)
        problem_log = _write_problem_log(out_dir, problems)
    except BaseException as e:
        for s in sinks:
            s.abort()
        if isinstance(e, ShardWriteError):  # refused after the folder was touched: leave nothing of this run
            for s in sinks:
                for entry in s.entries:
                    os.remove(os.path.join(out_dir, entry["name"]))
            for name in (NOTE_STATS_FILE, PROBLEM_LOG):
                if os.path.exists(os.path.join(out_dir, name)):
                    os.remove(os.path.join(out_dir, name))
            spool.close()
            if created and not os.listdir(out_dir):
                remove_made(created)
        raise
    finally:
        spool.close()

    entries = [e for s in sinks for e in s.entries]
    new_names = {e["name"] for e in entries}
    for name in old_shards:
        if name not in new_names:
            os.remove(os.path.join(out_dir, name))
    patterns = {}
    for s in sinks:
        patterns[f"{s.kind}-{s.split}"] = shard_pattern([e["name"] for e in s.entries])
    manifest = {
        "format": "notellm2-shards", "version": FORMAT_VERSION,
        "settings": settings_dict,
        "sources": {**sources, "images": {"read": len(with_image), "sha256": image_digest.hexdigest()}},
        "counts": counts,
        "note_stats": note_stats,
        "problems": {k: p.to_dict() for k, p in problems.items()},
        **({"problem_log": problem_log} if problem_log else {}),
        "patterns": patterns,
        "shards": entries,
    }
    write_manifest(out_dir, manifest)
    return manifest


def _refuse_nothing_to_write(split_pairs: dict, counts: dict, problems: dict, pairs_path: str, catalog: str) -> None:
    """Zero pairs in every split is never what the user wanted (a catalog of other ids, a pairs file of
    other splits): refused, naming what dropped them, before a manifest could mark an empty set complete."""
    if any(split_pairs.values()):
        return
    why = "; ".join(f"{split}: {c['pairs_in']} in, {c['missing_note_pairs']} with a note missing from the catalog, "
                    f"{c['self_pairs']} self, {c['duplicate_pairs']} duplicate, {c['bad_image_pairs']} bad image"
                    for split, c in counts.items())
    first = problems["missing_note"].first[:3] or problems["bad_image"].first[:3]
    raise ShardWriteError(f"{pairs_path}: no pair to write with catalog {catalog} ({why})"
                          + (f"; first ids: {', '.join(first)}" if first else "")
                          + "; nothing was written")


def _write_problem_log(out_dir: str, problems: dict) -> Optional[str]:
    """Every missing note and bad image (not only the first few of the manifest), one JSON line each, in
    the order they were found: PROBLEM_LOG beside the shards. None (and no file) when there are none."""
    if not any(p.count for p in problems.values()):
        return None
    with atomic_write(os.path.join(out_dir, PROBLEM_LOG)) as fh:
        for kind, p in problems.items():
            for ident, detail in zip(p.all_ids, p.all_details):
                fh.write(json.dumps({"kind": kind, "note_id": ident, "detail": detail}, ensure_ascii=False) + "\n")
    return PROBLEM_LOG


def write_manifest(out_dir: str, manifest: dict) -> None:
    """out_dir/manifest.json, atomically (a hidden temporary file, flushed to disk, renamed)."""
    atomic_write_text(os.path.join(out_dir, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def verify_shards(out_dir: str) -> list[str]:
    """Check a shard directory against its manifest: every listed shard exists, has the recorded
    sha256 and sample count. Returns a list of problems (empty when all is well)."""
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.isfile(path):
        return [f"{path}: no manifest (the shard set is incomplete or was not written by write-shards)"]
    try:
        with open(path, encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return [f"{path}: not valid JSON ({e})"]
    out = []
    entries = manifest.get("shards") if isinstance(manifest, dict) else None
    if not isinstance(entries, list):
        return [f"{path}: no 'shards' list (not a write-shards manifest)"]
    for i, e in enumerate(entries):
        if not (isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("sha256"), str)
                and isinstance(e.get("count"), int)):
            out.append(f"{path}: shards[{i}] is not an entry with name, sha256 and count: {str(e)[:80]}")
            continue
        p = os.path.join(out_dir, e["name"])
        if not os.path.isfile(p):
            out.append(f"{p}: listed in the manifest but missing")
            continue
        if sha256_file(p) != e["sha256"]:
            out.append(f"{p}: sha256 differs from the manifest")
            continue
        try:
            with tarfile.open(p) as tf:
                keys = {m.name.split(".", 1)[0] for m in tf.getmembers()}
        except tarfile.TarError as err:
            out.append(f"{p}: not a readable tar ({err})")
            continue
        if len(keys) != e["count"]:
            out.append(f"{p}: {len(keys)} samples, manifest says {e['count']}")
    return out
