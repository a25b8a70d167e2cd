"""Shaping a catalog for a benchmark: a per-category cap and a text-blanked fraction (docs/benchmark.md).

Both choose notes by a hash of the note id, never by position or a random generator, so a note's fate
does not depend on which other notes are in the catalog or in which order they come:

    unit(salt, note_id) = int(sha256("<salt>:<note_id>").hexdigest()[:15], 16) / 16**15   (in [0, 1))

- `cap_per_category(notes, n)` keeps, in each category, the `n` notes with the smallest
  `unit("cap", note_id)` (all of a category with at most `n`), in their original order. Notes without a
  category form one group of their own.
- `blank_text(notes, fraction, seed)` empties title, topics and content of every note with
  `unit("blank-text:<seed>", note_id) < fraction`: a picture-only post. The image stays.

The salts differ from the mining's hash split (`sha256("<seed>:<note_id>")`, data_shards/mining/mine.py),
so which notes are blanked or capped is independent of which notes are held out for test: the
short-text regime covers train and test alike.
"""
from __future__ import annotations

import hashlib
from typing import Optional

HASH_DIGITS = 15


def unit(salt: str, note_id: str) -> float:
    """A note's position in [0, 1) for a given salt (the module docstring has the formula)."""
    h = hashlib.sha256(f"{salt}:{note_id}".encode("utf-8")).hexdigest()[:HASH_DIGITS]
    return int(h, 16) / 16 ** HASH_DIGITS


def cap_per_category(notes: list[dict], max_per_category: Optional[int]) -> list[dict]:
    """At most `max_per_category` notes of each category, hash-sampled by note id; order kept."""
    if max_per_category is None:
        return list(notes)
    if isinstance(max_per_category, bool) or not isinstance(max_per_category, int) or max_per_category <= 0:
        raise ValueError(f"max_per_category: got {max_per_category!r}; allowed: an integer > 0")
    groups: dict = {}
    for n in notes:
        groups.setdefault(n.get("category"), []).append(n["note_id"])
    keep = set()
    for ids in groups.values():
        keep.update(sorted(ids, key=lambda i: (unit("cap", i), i))[:max_per_category])
    return [n for n in notes if n["note_id"] in keep]


def blank_text(notes: list[dict], fraction: float, seed: int = 0) -> int:
    """Empty title, topics and content of a hashed `fraction` of `notes` (in place); returns how many."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"blank_text_fraction: got {fraction!r}; allowed: a number in [0, 1]")
    blanked = 0
    for n in notes:
        if unit(f"blank-text:{int(seed)}", n["note_id"]) < fraction:
            n["title"], n["topics"], n["content"] = "", [], ""
            blanked += 1
    return blanked
