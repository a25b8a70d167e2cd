"""`notellm2 data import-pairs`: related pairs the user already has, into the folder mining writes.

Inputs, either form:
- one file per split (`--train A.csv --val B.csv --test C.csv`, any subset with at least `train`):
  the paper's header-less CSV `query_id,target_id`, a CSV with a header (query_id, target_id and an
  optional score), or Parquet with those columns;
- one file with a `split` column (`--pairs all.parquet` or `all.csv` with a header).

Output, as `notellm2 data mine-pairs` writes it (data_shards/mining/pairs_file.py reads both):
- `pairs.parquet` (query_id, target_id, score, split) in input order; score 1.0 when the file has none;
- `note_split.parquet` (note_id, split): each note in the split of its pairs;
- `import_manifest.json`: the inputs (with sha256), the counts and the rules applied.

Rules, each a one-line `PairImportError` naming the file (and row):
- every id must be in the catalog (`--catalog`); the first missing ones are named;
- a note may not sit in two splits (it would leak test notes into training) unless
  `allow_overlap`; then it is kept in every split it appears in and note_split.parquet gives it the
  split that is most held out (test, then val, then train), so evaluation never treats it as
  training-only;
- self pairs (query == target) are refused; duplicate (query, target, split) rows are kept once and
  counted.
"""
from __future__ import annotations

import csv
import json
import os
from typing import Optional

import numpy as np

from notellm2.errors import UserError
from notellm2.data_shards.mining.pairs_file import NOTE_SPLIT_FILE, PAIRS_FILE, SPLITS
from notellm2.files import atomic_write_json, commit_file, sha256_file, temporary_name
from notellm2.outputs import check_folder_output, reuse_finished

MANIFEST = "import_manifest.json"

HELD_OUT_ORDER = {"test": 0, "val": 1, "train": 2}  # note_split: the most held-out split wins (overlap allowed)


class PairImportError(UserError, ValueError):
    """A pairs file that cannot be imported as given (named in the message)."""


def _read_csv(path: str, need_split: bool):
    import pandas as pd

    try:
        return _read_csv_text(path, need_split)
    except (UnicodeDecodeError, csv.Error, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise PairImportError(f"{path}: not a readable UTF-8 CSV ({type(e).__name__}: {first})") from None


def _read_csv_text(path: str, need_split: bool):
    import pandas as pd

    with open(path, newline="", encoding="utf-8") as fh:
        first = next(csv.reader(fh), None)
    if first is None:
        raise PairImportError(f"{path}: empty file")
    header = [c.strip() for c in first]
    if "query_id" in header and "target_id" in header:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    elif need_split:
        raise PairImportError(f"{path}: --pairs needs a header with query_id, target_id and split; got {first!r}")
    elif len(first) == 2:  # the paper's header-less query_id,target_id
        df = pd.read_csv(path, header=None, names=["query_id", "target_id"], dtype=str, keep_default_na=False)
    else:
        raise PairImportError(f"{path}: expected a header-less 'query_id,target_id' CSV or a header naming "
                              f"query_id and target_id; the first row has {len(first)} fields: {first!r}")
    if "score" in df.columns:
        df["score"] = pd.to_numeric(df["score"], errors="coerce")
    return df


def _read(path: str, need_split: bool):
    import pandas as pd

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: pairs file does not exist")
    if path.endswith(".parquet"):
        try:
            df = pd.read_parquet(path)
        except Exception as e:
            raise PairImportError(f"{path}: cannot read as Parquet ({type(e).__name__}: {e})") from None
    else:
        df = _read_csv(path, need_split)
    need = ["query_id", "target_id"] + (["split"] if need_split else [])
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise PairImportError(f"{path}: missing columns {', '.join(missing)} (have: {', '.join(map(str, df.columns))})")
    cols = need + (["score"] if "score" in df.columns else [])
    df = df[cols].copy()
    for col in ("query_id", "target_id"):
        df[col] = df[col].astype(str).str.strip()
        empty = df.index[df[col] == ""]
        if len(empty):
            raise PairImportError(f"{path}: row {int(empty[0])}: empty {col}")
    if "score" in df.columns:
        try:
            df["score"] = pd.to_numeric(df["score"], errors="coerce").astype(float)
        except (TypeError, ValueError):
            raise PairImportError(f"{path}: column 'score' is not numeric") from None
        bad = df.index[~np.isfinite(df["score"].to_numpy())]
        if len(bad):
            value = float(df["score"].iloc[int(bad[0])])
            raise PairImportError(f"{path}: row {int(bad[0])}: score is not a number" if value != value else
                                  f"{path}: row {int(bad[0])}: score is not finite ({value})")
    else:
        df["score"] = 1.0
    return df


def import_pairs(out_dir: str, catalog: str, split_files: Optional[dict] = None, pairs: Optional[str] = None,
                 allow_overlap: bool = False, image_root: Optional[str] = None, overwrite: bool = False) -> dict:
    """Write pairs.parquet, note_split.parquet and import_manifest.json into `out_dir`; returns the manifest.

    A finished import of the same files and settings in `out_dir` is returned as it is (with "unchanged");
    one of other files or settings, or a mined pairs folder, is refused unless `overwrite`."""
    import pandas as pd

    from notellm2.data_shards.catalog.notes import load_catalog

    check_folder_output(out_dir)

    split_files = {k: v for k, v in (split_files or {}).items() if v}
    if bool(split_files) == bool(pairs):
        raise PairImportError("give either one file per split (--train/--val/--test) or one --pairs file with a split column")
    if split_files and "train" not in split_files:
        raise PairImportError("a --train file is needed (the other splits are optional)")
    frames, sources = [], []
    if pairs:
        df = _read(pairs, need_split=True)
        df["split"] = df["split"].astype(str).str.strip()
        unknown = sorted(set(df["split"]) - set(SPLITS))
        if unknown:
            raise PairImportError(f"{pairs}: unknown split values {unknown}; allowed: {', '.join(SPLITS)}")
        df["_file"] = pairs
        frames.append(df)
        sources.append({"path": os.path.abspath(pairs), "sha256": sha256_file(pairs)})
    for split in SPLITS:
        if split in split_files:
            df = _read(split_files[split], need_split=False)
            df["split"] = split
            df["_file"] = split_files[split]
            frames.append(df)
            sources.append({"path": os.path.abspath(split_files[split]), "split": split,
                            "sha256": sha256_file(split_files[split])})
    df = pd.concat(frames, ignore_index=True)
    if df.empty:
        raise PairImportError("no pairs in the input files")
    selfs = df.index[df["query_id"] == df["target_id"]]
    if len(selfs):
        r = df.loc[selfs[0]]
        raise PairImportError(f"{r['_file']}: a pair of note {r['query_id']!r} with itself")

    known = {n.note_id for n in load_catalog(catalog, image_root=image_root)}
    missing = list(dict.fromkeys(i for pair in zip(df["query_id"], df["target_id"]) for i in pair if i not in known))
    if missing:
        raise PairImportError(f"{catalog}: {len(missing)} note ids of the pairs are not in the catalog "
                              f"(first: {', '.join(map(repr, missing[:5]))})")

    notes = pd.concat([df[["query_id", "split", "_file"]].rename(columns={"query_id": "note_id"}),
                       df[["target_id", "split", "_file"]].rename(columns={"target_id": "note_id"})])
    per_note = notes.groupby("note_id", sort=False)["split"].agg(lambda s: sorted(set(s), key=HELD_OUT_ORDER.get))
    overlap = per_note[per_note.map(len) > 1]
    if len(overlap) and not allow_overlap:
        nid = overlap.index[0]
        raise PairImportError(f"note {nid!r} is in the {' and '.join(overlap.iloc[0])} pairs ({len(overlap)} notes sit in "
                              f"more than one split); a test note seen in training inflates recall. Fix the files, "
                              f"or pass --allow-overlap to keep them")
    before = len(df)
    df = df.drop_duplicates(subset=["query_id", "target_id", "split"], keep="first")
    request = {"inputs": [{k: v for k, v in src.items() if k != "path"} for src in sources],
               "catalog_sha256": sha256_file(catalog), "allow_overlap": bool(allow_overlap)}
    recorded = _recorded_request(out_dir)
    if reuse_finished(out_dir, recorded, request, overwrite, "a finished pairs folder", error=PairImportError):
        with open(os.path.join(out_dir, MANIFEST)) as fh:
            return {**json.load(fh), "unchanged": True}
    for name in (MANIFEST, "mining_manifest.json"):  # incomplete until the new manifest lands
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    os.makedirs(out_dir, exist_ok=True)
    out_pairs = df[["query_id", "target_id", "score", "split"]].reset_index(drop=True)
    note_split = pd.DataFrame({"note_id": per_note.index.astype(str), "split": per_note.map(lambda s: s[0]).values})
    _write_parquet(out_pairs, os.path.join(out_dir, PAIRS_FILE))
    _write_parquet(note_split, os.path.join(out_dir, NOTE_SPLIT_FILE))
    manifest = {
        "source": "import-pairs", "inputs": sources, "catalog": os.path.abspath(catalog),
        "catalog_sha256": request["catalog_sha256"],
        "pairs": {s: int((out_pairs["split"] == s).sum()) for s in SPLITS},
        "notes": {s: int((note_split["split"] == s).sum()) for s in SPLITS},
        "duplicates_dropped": int(before - len(df)),
        "notes_in_several_splits": int(len(overlap)), "allow_overlap": bool(allow_overlap),
        "score_default": 1.0,
    }
    atomic_write_json(os.path.join(out_dir, MANIFEST), manifest, indent=2)
    return manifest


def _recorded_request(out_dir: str) -> Optional[dict]:
    """The request of the finished pairs folder in `out_dir`: an import's (from its manifest), or a
    marker that a mining wrote it (never the same as an import); None when there is none."""
    if os.path.isfile(os.path.join(out_dir, "mining_manifest.json")):
        return {"written_by": "mine-pairs"}
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as fh:
            m = json.load(fh)
        return {"inputs": [{k: v for k, v in src.items() if k != "path"} for src in m["inputs"]],
                "catalog_sha256": m.get("catalog_sha256"), "allow_overlap": m.get("allow_overlap")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {"import_manifest.json": "unreadable"}


def _write_parquet(df, path: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = temporary_name(path)
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp)
    commit_file(tmp, path)
