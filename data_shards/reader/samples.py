"""Sample parsing: a shard sample's members -> checked notes -> `NoteItem`s, and what went wrong.

A bad sample never raises out of a worker: its problem is a `BadSample(reason, message)`, counted and
reported by a `Recorder` that travels with the next batch to the rank's main process, which logs it
once (`BadSampleLog`). The reasons and what each loader does about them are in docs/reader.md.

`ItemLoader` is the one path from a parsed note to a `NoteItem`, for pairs and notes alike: read and
decode the note's image (a bad image is blanked when the loader allows it, else the sample fails)
and render the note's text with the injected `encode_fn` (a failure there is `encode_error`).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Callable, Iterable, Optional

from notellm2.errors import UserError

from notellm2.data_shards.reader.collate import NoteItem, note_text_dict, prepare_image
from notellm2.data_shards.images import BadImage, open_image
from notellm2.data_shards.reader.shard_index import Sample, ShardFiles

log = logging.getLogger("notellm2.data_shards.reader")  # one logger for the whole reader (docs/reader.md)

IMAGE_REASONS = ("bad_image", "image_over_pixel_limit", "truncated_image")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class BadSample(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def require_members(sample: Sample, members: Iterable[str]) -> None:
    exts = {m[0] for m in sample[1]}
    for member in members:
        if member not in exts:
            raise BadSample("missing_member", f"member {member} is missing (members: {sorted(exts)})")


def read_members(files: ShardFiles, path: str, sample: Sample, wanted: Iterable[str]) -> dict:
    """{ext: bytes} for the wanted members present; a truncated member raises BadSample."""
    members = {ext: (off, size, trunc) for ext, off, size, trunc in sample[1]}
    out = {}
    for ext in wanted:
        if ext not in members:
            continue
        off, size, trunc = members[ext]
        try:
            data = files.read(path, off, size) if not trunc else b""
        except OSError as e:
            raise BadSample("read_error", f"cannot read member {ext}: {e}") from None
        if trunc or len(data) != size:
            raise BadSample("truncated_image" if ext.endswith(IMAGE_EXTS) else "truncated",
                             f"member {ext} is truncated ({len(data)} of {size} bytes)")
        out[ext] = data
    return out


def parse_note(raw: bytes, member: str) -> dict:
    try:
        note = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadSample("bad_json", f"{member}: not valid JSON ({e})") from None
    if not isinstance(note, dict):
        raise BadSample("bad_json", f"{member}: expected a JSON object, got {type(note).__name__}")
    for key in ("note_id", "title", "content"):
        if not isinstance(note.get(key), str):
            got = "missing" if key not in note else f"{type(note[key]).__name__} {note[key]!r}"[:80]
            raise BadSample("missing_field", f"{member}: field {key!r} must be a string ({got})")
    if not note["note_id"]:
        raise BadSample("missing_field", f"{member}: field 'note_id' is empty")
    topics = note.get("topics")
    if topics is not None and (not isinstance(topics, list) or not all(isinstance(t, str) for t in topics)):
        raise BadSample("missing_field", f"{member}: field 'topics' must be a list of strings")
    return note


def decode_image(raw: Optional[bytes], member: str, max_pixels: int, image_size: int, flip: bool):
    if raw is None:
        return None
    try:
        img = open_image(raw, max_pixels)
    except BadImage as e:
        msg = str(e)
        reason = "image_over_pixel_limit" if ("exceeds" in msg or "DecompressionBomb" in msg) else "bad_image"
        raise BadSample(reason, f"{member}: {msg}") from None
    return prepare_image(img, image_size, flip=flip)


def image_member(sample: Sample, prefix: str) -> Optional[str]:
    exts = {m[0] for m in sample[1]}
    for ext in IMAGE_EXTS:
        name = f"{prefix}{ext}"
        if name in exts:
            return name
    return None


def read_pair_notes(files: ShardFiles, path: str, sample: Sample) -> tuple[dict, dict]:
    """The query and target notes of a pair sample (q.json, t.json), checked against pair.json if present."""
    require_members(sample, ("q.json", "t.json"))
    raw = read_members(files, path, sample, ["q.json", "t.json", "pair.json"])
    q_note, t_note = parse_note(raw["q.json"], "q.json"), parse_note(raw["t.json"], "t.json")
    if "pair.json" in raw:
        try:
            pair = json.loads(raw["pair.json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadSample("bad_json", f"pair.json: not valid JSON ({e})") from None
        if not isinstance(pair, dict) or pair.get("query_id") != q_note["note_id"] or \
                pair.get("target_id") != t_note["note_id"]:
            raise BadSample("malformed_pair", f"pair.json {str(pair)[:120]} does not match q.json/t.json "
                            f"({q_note['note_id']!r}, {t_note['note_id']!r})")
    return q_note, t_note


def read_note(files: ShardFiles, path: str, sample: Sample) -> dict:
    """The note of a notes-shard sample (json)."""
    require_members(sample, ("json",))
    return parse_note(read_members(files, path, sample, ["json"])["json"], "json")


class ItemLoader:
    """One note of a sample -> NoteItem (picklable: it travels to the loader workers).

    blank_bad_images: a note whose image is bad (IMAGE_REASONS) keeps a blank image (recorded as
    "blanked") instead of failing the sample.

    cache: a `notellm2.data_shards.vision_cache.VisionCache`; then the image member is not read: the note's
    item carries the (orientation, row) of its cached features, and an image the cache recorded as bad
    goes through the same policy as one that fails to decode here."""

    def __init__(self, encode_fn: Callable[[dict], dict], collate_text_fn: Callable[[list], dict], image_size: int,
                 max_pixels: int, blank_bad_images: bool, cache=None):
        self.encode_fn, self.collate_text_fn, self.image_size = encode_fn, collate_text_fn, image_size
        self.max_pixels, self.blank_bad_images = max_pixels, blank_bad_images
        self.cache = cache

    def load(self, files: ShardFiles, path: str, sample: Sample, note: dict, prefix: str, flip: bool,
             recorder: "Recorder", where: str) -> NoteItem:
        """The item of `note`, whose image member (if any) is `{prefix}jpg|jpeg|png|webp`; raises BadSample."""
        pixels = feature = None
        member = image_member(sample, prefix)
        if member is not None:
            try:
                if self.cache is not None:
                    feature = self.cache.lookup(note["note_id"], flip, where)
                    if feature is None:
                        reason, message = self.cache.bad_reason(note["note_id"])
                        raise BadSample(reason, f"{message} (recorded by the vision cache)")
                else:
                    raw = read_members(files, path, sample, [member])[member]
                    pixels = decode_image(raw, member, self.max_pixels, self.image_size, flip)
            except BadSample as e:
                if not self.blank_bad_images or e.reason not in IMAGE_REASONS:
                    raise
                recorder.bad(where, e.reason, str(e), "blanked")
                pixels = feature = None
        try:
            encoding = self.encode_fn(note_text_dict(note, pixels is not None or feature is not None))
        except Exception as e:  # the prompter rejected this note's text
            raise BadSample("encode_error", f"encode_fn failed on note {note['note_id']!r}: "
                            f"{type(e).__name__}: {e}") from None
        return NoteItem(note["note_id"], encoding, pixels, feature=feature)


# ----------------------------------------------------------------------------- what went wrong

class Recorder:
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


def merge_counts(into: dict, delta: dict):
    for group, bucket in delta.items():
        dst = into.setdefault(group, {})
        for reason, n in bucket.items():
            dst[reason] = dst.get(reason, 0) + n



def new_stats() -> dict:
    return {"batches": 0, "dropped": {}, "blanked": {}, "refill": {}, "shard_problems": 0}


class NoUsableData(UserError, RuntimeError):
    """The shards gave no usable sample where one was needed (every candidate bad): one line naming the
    shards' problem counts and the bad-sample log that lists them."""


class BadSampleLog:
    """Logs each bad sample once per loader (by (where, reason)), in the rank's main process:
    `template % (where, message, reason, what[action], *extra)`; with `path`, also one JSON line per
    sample in that file (the bad-sample log: where, reason, message, action), appended, so that a
    summary can point at the file that lists them all."""

    def __init__(self, template: str, what: dict, extra: tuple = (), path: Optional[str] = None):
        self.template, self.what, self.extra, self.path = template, what, extra, path
        self.seen: set = set()

    def __call__(self, where: str, reason: str, message: str, action: str) -> None:
        if (where, reason) not in self.seen:
            self.seen.add((where, reason))
            log.warning(self.template, where, message, reason, self.what.get(action, action), *self.extra)
            self.write(where, reason, message, action)

    def write(self, where: str, reason: str, message: str, action: str) -> None:
        if not self.path:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"sample": where, "reason": reason, "message": message, "action": action},
                                ensure_ascii=False) + "\n")

    def describe(self) -> str:
        return f"the bad-sample log {self.path}" if self.path else "the bad-sample warnings above"


def counts_line(counts: dict) -> str:
    """{"bad_image": 3, "bad_json": 1} -> "bad_image 3, bad_json 1" (largest first)."""
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
