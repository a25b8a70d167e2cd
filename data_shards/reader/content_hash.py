"""A note's content hash: what the encoder reads of a note, hashed, so that a later embedding run can
tell which notes changed (`notellm2 embed --base`) and a related table can tell re-posts apart.

The hash covers exactly the model's input: the text fields the prompter renders (title, content,
topics; notellm2.data_shards.reader.collate.note_text_dict) and the bytes of the note's image member
as stored in the shard (the re-encoded JPEG of `write-shards` / `write-notes`: the same source image
under the same shard settings gives the same bytes). The note id is not part of it, so two re-posts
of one note share their hash; nor is the category, which no prompt reads.

It is the first `HASH_BYTES` bytes of a SHA-256 over a canonical JSON of the text fields, a zero
byte, then the image bytes (none for a note without an image): 128 bits, so that a 100M-note
catalog has a collision chance of about 1e-23.
"""
from __future__ import annotations

import hashlib
import json
from typing import Iterable, Optional, Union

import numpy as np

HASH_BYTES = 16
TEXT_FIELDS = ("title", "content", "topics")


def note_content_hash(note: dict, image: Optional[bytes]) -> bytes:
    """The `HASH_BYTES`-byte content hash of a note dict (title, content, topics) and its image bytes."""
    text = {"title": note["title"], "content": note["content"], "topics": list(note.get("topics") or [])}
    h = hashlib.sha256(json.dumps(text, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8"))
    h.update(b"\0" if image is None else b"\1")
    if image is not None:
        h.update(image)
    return h.digest()[:HASH_BYTES]


def shard_content_hashes(shards: Union[str, Iterable[str]], with_locations: bool = False):
    """(note ids in shard order, uint8 [notes, HASH_BYTES]) of every note of a notes shard set, and with
    `with_locations` a third item: each note's (shard path, sample) for `copy_notes`.

    Reads each sample's `json` member and its image member (the one the loader would read). A sample
    without a readable note is left out: the notes loader cannot embed it either (a padding row)."""
    from notellm2.data_shards.reader.samples import BadSample, image_member, parse_note, read_members
    from notellm2.data_shards.reader.shard_index import ShardFiles, expand_shards, index_shard

    ids: list[str] = []
    hashes: list[bytes] = []
    locations: list[tuple] = []
    files = ShardFiles()
    try:
        for path in (expand_shards(shards) if shards else []):
            for sample in index_shard(path).samples:
                member = image_member(sample, "")
                try:
                    raw = read_members(files, path, sample, ["json"] + ([member] if member else []))
                    if "json" not in raw:
                        raise BadSample("missing_member", "member json is missing")
                    note = parse_note(raw["json"], "json")
                except BadSample:
                    continue
                ids.append(note["note_id"])
                hashes.append(note_content_hash(note, raw.get(member) if member else None))
                locations.append((path, sample))
    finally:
        files.close()
    table = np.frombuffer(b"".join(hashes), np.uint8).reshape(len(hashes), HASH_BYTES).copy()
    return (ids, table, locations) if with_locations else (ids, table)


def hash_keys(hashes: np.ndarray) -> np.ndarray:
    """One comparable key per row of a uint8 [n, HASH_BYTES] table (a numpy void scalar of its bytes):
    equal keys are equal hashes; `np.unique` and `np.isin` work on them."""
    table = np.ascontiguousarray(hashes, np.uint8)
    return table.view(np.dtype((np.void, HASH_BYTES))).reshape(len(table))
