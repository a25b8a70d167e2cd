"""Readers of a pairs folder: `pairs.parquet` (query_id, target_id, score, split) and
`note_split.parquet` (note_id, split), as `notellm2 data mine-pairs` writes them (docs/mining.md).

Every reader of these files goes through here, so a bad file fails the same way everywhere: a
one-line `FileNotFoundError` or `ValueError` that names the file (and the row or column).
"""
from __future__ import annotations

import os

import numpy as np

SPLITS = ("train", "val", "test")
PAIR_COLUMNS = ("query_id", "target_id", "score", "split")
PAIRS_FILE = "pairs.parquet"
NOTE_SPLIT_FILE = "note_split.parquet"


def pairs_path(path) -> str:
    """`path` itself when it is a file, else `path/pairs.parquet`."""
    path = os.fspath(path)
    return os.path.join(path, PAIRS_FILE) if os.path.isdir(path) else path


def pairs_dir(path) -> str:
    """The folder of a pairs folder or of a pairs.parquet file."""
    path = os.fspath(path)
    return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))


def _read_table(path: str, columns, what: str):
    import pyarrow.parquet as pq

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: {what} does not exist (expected the output dir of "
                                f"`notellm2 data mine-pairs`)")
    try:
        names = pq.read_schema(path).names
    except Exception as e:
        raise ValueError(f"{path}: cannot read as Parquet ({type(e).__name__}: {e})") from None
    missing = [c for c in columns if c not in names]
    if missing:
        raise ValueError(f"{path}: missing columns {', '.join(missing)} (have: {', '.join(map(str, names))})")
    return pq.read_table(path, columns=list(columns)).to_pandas()


def _check_strings(df, path: str, cols) -> None:
    for col in cols:
        values = df[col]
        bad = values.isna().to_numpy() | ~values.map(lambda v: isinstance(v, str) and v != "").to_numpy(bool)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{path}: row {i}: column '{col}' must be a non-empty string, got {values.iloc[i]!r}")


def _check_splits(df, path: str) -> None:
    unknown = sorted(set(df["split"]) - set(SPLITS))
    if unknown:
        raise ValueError(f"{path}: unknown split values {unknown}; allowed: {', '.join(SPLITS)}")


def read_pairs(path, split: str | None = None, columns=None):
    """Read and check a pairs file; returns a pandas DataFrame in file order.

    `path`: a pairs folder or a pairs.parquet file. `split`: keep only that split's rows (an empty
    split is a ValueError naming the file). `columns`: the columns to return (default all four).
    """
    import pandas as pd

    path = pairs_path(path)
    columns = list(PAIR_COLUMNS if columns is None else columns)
    unknown = [c for c in columns if c not in PAIR_COLUMNS]
    if unknown:
        raise ValueError(f"{path}: unknown pair columns requested {unknown}; allowed: {', '.join(PAIR_COLUMNS)}")
    if split is not None and split not in SPLITS:
        raise ValueError(f"{path}: unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    need = [c for c in PAIR_COLUMNS if c in columns or (c == "split" and split is not None)]
    df = _read_table(path, need, "pairs file")
    _check_strings(df, path, [c for c in ("query_id", "target_id", "split") if c in need])
    if "split" in need:
        _check_splits(df, path)
    if "score" in need:
        try:
            df["score"] = pd.to_numeric(df["score"]).astype("float64")
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: column 'score' must be numeric ({e})") from None
        nonfinite = ~np.isfinite(df["score"].to_numpy())
        if nonfinite.any():
            i = int(np.flatnonzero(nonfinite)[0])
            raise ValueError(f"{path}: row {i}: 'score' must be finite, got {df['score'].iloc[i]}")
    if split is not None:
        present = sorted(set(df["split"]), key=SPLITS.index)
        df = df[df["split"] == split].reset_index(drop=True)
        if df.empty:
            raise ValueError(f"{path}: no pairs in split {split!r} (splits present: {', '.join(present) or 'none'})")
    return df[columns]


def read_note_split(pairs_dir_or_file):
    """Read and check `note_split.parquet` of a pairs folder: DataFrame (note_id, split), one row
    per note of the view log. FileNotFoundError (naming the file) when it is absent."""
    path = os.path.join(pairs_dir(pairs_dir_or_file), NOTE_SPLIT_FILE)
    df = _read_table(path, ("note_id", "split"), "note split file")
    _check_strings(df, path, ("note_id", "split"))
    _check_splits(df, path)
    dup = df["note_id"].duplicated()
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        raise ValueError(f"{path}: row {i}: note_id {df['note_id'].iloc[i]!r} appears more than once")
    return df.reset_index(drop=True)


def has_note_split(pairs_dir_or_file) -> bool:
    return os.path.isfile(os.path.join(pairs_dir(pairs_dir_or_file), NOTE_SPLIT_FILE))
