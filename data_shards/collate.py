"""Turning decoded notes into batch tensors (runs inside the loader workers).

A pair batch holds N = 2B rows: the B queries first, then the B targets, so that row i (a query)
is paired with row B + i (its target). A notes batch holds one row per note.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from data_shards.ids import note_id_hash

# note id hash used for padding rows of the notes loader (real hashes are never negative)
DUMMY_NOTE_ID = -1


@dataclass
class NoteItem:
    """One note ready for collation: its text encoding (from encode_fn) and its image tensor."""
    note_id: str
    encoding: dict
    pixels: Optional[torch.Tensor]  # [3, S, S] normalised, or None when the note has no usable image
    is_dummy: bool = False


def note_text_dict(note: dict, has_image: bool) -> dict:
    """The note dict handed to `encode_fn` (the prompter's input)."""
    return {
        "note_id": note["note_id"],
        "title": note["title"],
        "content": note["content"],
        "topics": list(note.get("topics") or []),
        "has_image": bool(has_image),
    }


def collate_notes(notes: list[NoteItem], collate_text_fn: Callable[[list[dict]], dict], image_size: int) -> dict:
    """Stack notes into tensors.

    Returns the text tensors of `collate_text_fn` plus `pixel_values` [N,3,S,S] float32 (a note
    without a usable image gets zeros, i.e. the CLIP mean colour), `has_image` BoolTensor [N],
    `note_ids` LongTensor [N] (`note_id_hash`, -1 for padding rows) and `note_id_strs` (list of str).
    """
    n = len(notes)
    text = collate_text_fn([item.encoding for item in notes])
    if not isinstance(text, dict):
        raise TypeError(f"collate_text_fn must return a dict of tensors, got {type(text).__name__}")
    pixel_values = torch.zeros(n, 3, image_size, image_size, dtype=torch.float32)
    has_image = torch.zeros(n, dtype=torch.bool)
    for i, item in enumerate(notes):
        if item.pixels is not None:
            pixel_values[i].copy_(item.pixels)
            has_image[i] = True
    note_ids = torch.tensor([DUMMY_NOTE_ID if item.is_dummy else note_id_hash(item.note_id) for item in notes],
                            dtype=torch.long)
    batch = dict(text)
    batch.update(pixel_values=pixel_values, has_image=has_image, note_ids=note_ids,
                 note_id_strs=[item.note_id for item in notes])
    return batch


def collate_pairs(pairs: list[tuple[NoteItem, NoteItem]], collate_text_fn: Callable[[list[dict]], dict],
                  image_size: int) -> dict:
    """[queries; targets]: row i is the query of pair i, row B + i its target."""
    rows = [q for q, _ in pairs] + [t for _, t in pairs]
    return collate_notes(rows, collate_text_fn, image_size)
