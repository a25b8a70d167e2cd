"""The evaluation's subsets (model-free, so every run of a table gets the same ones) and the
protocol's model-free statistics (docs/evaluation.md, "Subsets").

    short_query / long_query, short_target / long_target
        characters of every text field a model reads (title + topics + content) at most / above the
        `length_quantile` quantile of the evaluated notes' lengths
    text_poor / text_rich
        the query or the target has fewer than `text_poor_chars` characters (no text at all included) /
        both have at least that many
    cold_start, head, tail
        the target's training pairs: none / the top and bottom third of the others
    pop_head, pop_tail
        the target's appearances among the evaluated pairs: top and bottom third of the distinct targets

A subset that is empty, or that holds every evaluated pair (e.g. `cold_start` when the split holds the
test notes out of training), says nothing beside `all`: `degenerate` gives the reason, and the report
shows it as n/a with that reason.
"""
from __future__ import annotations

import hashlib
from typing import Optional

import numpy as np

DEFAULT_TEXT_POOR_CHARS = 20


def note_text(note) -> str:
    """Every text field a model reads: title, topics, content (one space between)."""
    return " ".join(x for x in [note.title, *note.topics, note.content] if x)


def text_chars(note) -> int:
    """Characters of the text fields (title + each topic + content; separators not counted)."""
    return len(note.title) + sum(len(t) for t in note.topics) + len(note.content)


def length_subsets(query_ids, target_ids, lengths: dict, quantile: float, notes) -> tuple[dict, float]:
    missing = [n for n in notes if n not in lengths]
    if missing:
        raise ValueError(f"catalog: {len(missing)} evaluated notes are not in it (first: {', '.join(missing[:5])})")
    thr = float(np.quantile([lengths[n] for n in notes], quantile))
    ql = np.array([lengths[n] for n in query_ids])
    tl = np.array([lengths[n] for n in target_ids])
    return {"short_query": ql <= thr, "long_query": ql > thr,
            "short_target": tl <= thr, "long_target": tl > thr}, thr


def text_poor_subsets(query_ids, target_ids, lengths: dict, min_chars: int) -> dict:
    """text_poor: the query or the target has fewer than `min_chars` characters of text; text_rich:
    both have at least `min_chars`."""
    ql = np.array([lengths[n] for n in query_ids])
    tl = np.array([lengths[n] for n in target_ids])
    poor = (ql < min_chars) | (tl < min_chars)
    return {"text_poor": poor, "text_rich": ~poor}


def popularity_subsets(target_ids, train_counts: dict) -> dict:
    counts = np.array([train_counts.get(t, 0) for t in target_ids])
    cold = counts == 0
    warm = sorted({t for t, c in zip(target_ids, counts) if c > 0}, key=lambda t: (-train_counts[t], t))
    third = len(warm) // 3
    head, tail = set(warm[:third]), set(warm[len(warm) - third:]) if third else set()
    return {"cold_start": cold, "head": np.array([t in head for t in target_ids], dtype=bool),
            "tail": np.array([t in tail for t in target_ids], dtype=bool)}


def split_popularity_subsets(query_ids, target_ids) -> dict:
    """Popularity within the evaluated pairs themselves: a target's appearances among them (as query or
    target). With notes held out by split (the paper protocol's test notes are in no training pair,
    so every target is cold for `popularity_subsets`), this is the popularity left to measure.
    pop_head / pop_tail: the pairs whose target is in the top / bottom third of the distinct targets
    by that count (ties by id)."""
    counts = train_pair_counts(zip(query_ids, target_ids))
    targets = sorted(set(target_ids), key=lambda t: (-counts[t], t))
    third = len(targets) // 3
    head, tail = set(targets[:third]), set(targets[len(targets) - third:]) if third else set()
    return {"pop_head": np.array([t in head for t in target_ids], dtype=bool),
            "pop_tail": np.array([t in tail for t in target_ids], dtype=bool)}


def train_pair_counts(train_pairs) -> dict:
    counts: dict = {}
    for q, t in train_pairs:
        counts[q] = counts.get(q, 0) + 1
        counts[t] = counts.get(t, 0) + 1
    return counts


def degenerate(mask: np.ndarray) -> Optional[str]:
    """Why a subset says nothing beside `all` (None when it does): empty, or every evaluated pair."""
    n = int(mask.sum())
    if n == 0:
        return "empty: no evaluated pair is in it"
    if n == len(mask):
        return f"equals all: every one of the {n} evaluated pairs is in it"
    return None


# ---------------------------------------------------------------------------------- duplicates
def _image_digest(path: Optional[str]) -> Optional[str]:
    """sha256 of the image file's bytes; None for a note without an image; an unreadable file gets a
    key of its own (it duplicates nothing)."""
    if path is None:
        return None
    try:
        from notellm2.files import sha256_file

        return sha256_file(path)
    except OSError:
        return "unreadable:" + hashlib.sha256(path.encode()).hexdigest()


def exact_duplicate_stats(test_notes: list[str], train_notes, catalog: dict) -> dict:
    """How many test notes have another note among the training notes with the same text fields
    (title, topics, content) and the same image bytes (or both no image). Only the images of notes
    whose text matches are read."""
    missing = [n for n in test_notes if n not in catalog]
    if missing:
        raise ValueError(f"catalog: {len(missing)} test notes are not in it (first: {', '.join(missing[:5])})")
    text = lambda n: (n.title, tuple(n.topics), n.content)  # noqa: E731
    by_text: dict = {}
    for nid in train_notes:
        note = catalog.get(nid)
        if note is not None:
            by_text.setdefault(text(note), []).append(note)
    digests: dict = {}

    def digest(note) -> Optional[str]:
        if note.note_id not in digests:
            digests[note.note_id] = _image_digest(note.image_path)
        return digests[note.note_id]

    same_text = same_both = 0
    for nid in test_notes:
        note = catalog[nid]
        others = [o for o in by_text.get(text(note), []) if o.note_id != nid]
        if others:
            same_text += 1
            if any(digest(o) == digest(note) for o in others):
                same_both += 1
    return {"test_notes_with_train_text_duplicate": same_text, "test_notes_with_exact_train_duplicate": same_both}
