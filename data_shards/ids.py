"""Stable integer ids for notes.

The contrastive loss masks in-batch duplicates (the same note appearing as the target of one pair
and the query or target of another) by comparing integer ids, which travel through collectives
far more cheaply than strings. The hash must be the same in every process, on every machine and
in every Python run, so Python's salted `hash()` is not usable; blake2b is.

    note_id_hash(note_id) = int.from_bytes(blake2b(utf8(note_id), digest_size=8), "big") & (2**63 - 1)

The top bit is cleared so the value fits a signed int64 (torch.long) and is never negative.
Two different note ids collide with probability about n^2 / 2^64 (for a million notes: ~3e-8).
"""
from __future__ import annotations

import hashlib
from typing import Iterable

import numpy as np

_MASK = (1 << 63) - 1


def note_id_hash(note_id: str) -> int:
    """Stable non-negative int64 for a note id (see the module docstring for the exact formula)."""
    if not isinstance(note_id, str):
        raise TypeError(f"note_id_hash: note ids are strings, got {type(note_id).__name__} {note_id!r}")
    digest = hashlib.blake2b(note_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") & _MASK


def note_id_hashes(note_ids: Iterable[str]) -> np.ndarray:
    """`note_id_hash` of each id, as an int64 numpy array (ready for `torch.from_numpy`)."""
    return np.fromiter((note_id_hash(n) for n in note_ids), dtype=np.int64)
