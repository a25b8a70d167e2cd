"""Reading a pairs folder: `pairs.parquet` (query_id, target_id, score, split) and
`note_split.parquet` (note_id, split), as `notellm2 data mine-pairs` writes them.

A minimal reader for evaluation; the mining side owns the full version of this module.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import pandas as pd

PAIRS_FILE = "pairs.parquet"
NOTE_SPLIT_FILE = "note_split.parquet"


def _pairs_path(path: str) -> str:
    p = os.path.join(path, PAIRS_FILE) if os.path.isdir(path) else path
    if not os.path.exists(p):
        raise FileNotFoundError(f"{p}: no pairs file (run `notellm2 data mine-pairs` first)")
    return p


def _read(path: str, columns: Sequence[str]) -> pd.DataFrame:
    import pyarrow.parquet as pq

    have = set(pq.read_schema(path).names)
    missing = [c for c in columns if c not in have]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)} (has {', '.join(sorted(have))})")
    return pd.read_parquet(path, columns=list(columns))


def read_pairs(path: str, split: Optional[str] = None, columns: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """The pairs in file order (index 0..n-1), optionally only those of `split`.

    path: a pairs folder or its pairs.parquet. columns: the columns to return (default all);
    ids come back as str.
    """
    p = _pairs_path(path)
    want = list(columns) if columns is not None else ["query_id", "target_id", "score", "split"]
    read = want + (["split"] if split is not None and "split" not in want else [])
    df = _read(p, read)
    if split is not None:
        df = df[df["split"] == split]
    df = df[want].reset_index(drop=True)
    for c in ("query_id", "target_id"):
        if c in df:
            df[c] = df[c].astype(str)
    return df


def read_note_split(pairs_dir: str) -> pd.DataFrame:
    """note_id -> split for every mined note (note_split.parquet beside pairs.parquet)."""
    base = pairs_dir if os.path.isdir(pairs_dir) else os.path.dirname(os.path.abspath(pairs_dir))
    p = os.path.join(base, NOTE_SPLIT_FILE)
    if not os.path.exists(p):
        raise FileNotFoundError(f"{p}: no note split (mine the pairs with a notellm2 that writes "
                                f"{NOTE_SPLIT_FILE}, or use `--protocol all-pairs`)")
    df = _read(p, ["note_id", "split"])
    df["note_id"] = df["note_id"].astype(str)
    if df["note_id"].duplicated().any():
        dup = df["note_id"][df["note_id"].duplicated()].iloc[0]
        raise ValueError(f"{p}: note {dup!r} is listed more than once")
    return df.reset_index(drop=True)
