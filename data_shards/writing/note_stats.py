"""Per-note statistics of the training pairs, for the two recommendation-aware negative options
(issue #14; docs/training.md, "Negatives"):

- `loss.logq_correction`: each note's sampling frequency q, its share of the training-pair
  appearances (a note in n of the P training pairs, as query or target, has q = n / 2P). In-batch
  negatives are drawn from the pair stream, so a note is a negative about q times as often as a
  uniformly drawn one; the loss subtracts log q_j from column j's logit (Yi et al., RecSys 2019).
- `loss.mask_known_positives`: each note's known related notes (its partners in the training
  pairs, either direction, best score first, at most `MAX_KNOWN`); a column holding one of the
  anchor's known positives, other than its own partner, is not a negative.

`notellm2 data write-shards` computes them from the training pairs it writes (after de-duplication
and its drops) and stores them beside the shards as `note_stats.parquet` (columns note_id,
appearances, q, known: list of note ids), recorded in the shard manifest under `note_stats`. They
are derived from the pairs file, so they add nothing to what identifies the data. Only training
pairs count: validation and test pairs never leak into the loss.

The pair loader (`NoteStats.annotate`) adds two keys to every pair batch when the run asks for them:

    sample_logq   float32  [N]     log q of each row's note (a note in no training pair: the floor
                                   q = 1 / 2P, one appearance)
    known_pos     int64    [N, K]  note_id_hash of each row's known positives, padded with KNOWN_PAD
                                   (-2: never a note hash, which is >= 0, nor the padding row's -1)
"""
from __future__ import annotations

import math
import os
from typing import Iterable, Optional

import numpy as np
import torch

from notellm2.data_shards.ids import note_id_hash
from notellm2.files import commit_file, sha256_file, temporary_name

NOTE_STATS_FILE = "note_stats.parquet"
MAX_KNOWN = 32
KNOWN_PAD = -2


class NoteStatsError(ValueError):
    """Missing or unusable note statistics (names the file)."""


def compute_note_stats(train_pairs: Iterable[tuple[str, str, float]], max_known: int = MAX_KNOWN):
    """A DataFrame (note_id, appearances, q, known) of the notes of `train_pairs` ((query, target,
    score), de-duplicated), sorted by note id. `known` lists a note's partners, highest score first
    (ties: by id), at most `max_known`."""
    import pandas as pd

    appearances: dict[str, int] = {}
    partners: dict[str, dict[str, float]] = {}
    n_pairs = 0
    for q, t, s in train_pairs:
        n_pairs += 1
        for a, b in ((q, t), (t, q)):
            appearances[a] = appearances.get(a, 0) + 1
            best = partners.setdefault(a, {})
            best[b] = max(float(s), best.get(b, float("-inf")))
    ids = sorted(appearances)
    known = [[b for b, _ in sorted(partners[a].items(), key=lambda kv: (-kv[1], kv[0]))[:max_known]] for a in ids]
    counts = np.array([appearances[a] for a in ids], dtype=np.int64)
    q = counts / (2.0 * n_pairs) if n_pairs else counts.astype(np.float64)
    return pd.DataFrame({"note_id": ids, "appearances": counts, "q": q, "known": known})


def write_note_stats(out_dir: str, stats, n_pairs: int, max_known: int = MAX_KNOWN) -> dict:
    """Write `stats` to out_dir/note_stats.parquet (atomically); return its manifest entry."""
    path = os.path.join(out_dir, NOTE_STATS_FILE)
    tmp = temporary_name(path)
    stats.to_parquet(tmp, index=False)
    commit_file(tmp, path)
    return {"file": NOTE_STATS_FILE, "sha256": sha256_file(path), "split": "train", "pairs": int(n_pairs),
            "notes": int(len(stats)), "max_known": int(max_known)}


def backfill_note_stats(shards_dir: str) -> dict:
    """note_stats.parquet for a shard set written before write-shards wrote it (`notellm2 data
    note-stats`): the training pairs are read back from the train pair shards (exactly the pairs
    written), the file is written and the manifest's `note_stats` entry set (the manifest replaced
    atomically). Returns the entry."""
    import json
    import tarfile

    from notellm2.data_shards.reader.shard_index import expand_shards
    from notellm2.data_shards.writing.shards import MANIFEST, write_manifest  # lazily: the writer imports this module

    manifest_path = os.path.join(shards_dir, MANIFEST)
    if not os.path.exists(manifest_path):
        raise NoteStatsError(f"{manifest_path}: no shard manifest (not a complete write-shards output)")
    with open(manifest_path, encoding="utf-8") as fh:
        manifest = json.load(fh)
    pattern = manifest.get("patterns", {}).get("pairs-train")
    if not pattern:
        raise NoteStatsError(f"{manifest_path}: the shard set has no train pair shards")
    pairs = []
    for path in expand_shards(os.path.join(shards_dir, pattern)):
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".pair.json"):
                    rec = json.loads(tar.extractfile(member).read())
                    pairs.append((rec["query_id"], rec["target_id"], float(rec["score"])))
    expected = manifest.get("counts", {}).get("train", {}).get("pairs_written")
    if expected is not None and expected != len(pairs):
        raise NoteStatsError(f"{shards_dir}: read {len(pairs)} train pairs from the shards, the manifest says {expected}")
    entry = write_note_stats(shards_dir, compute_note_stats(pairs), len(pairs))
    manifest["note_stats"] = entry
    write_manifest(shards_dir, manifest)
    return entry


def stats_path_for(shard_paths: list[str]) -> str:
    """Where the statistics of these shards are: beside them (the first shard's folder)."""
    if not shard_paths:
        raise NoteStatsError("note statistics: no shards given")
    return os.path.join(os.path.dirname(os.path.abspath(shard_paths[0])), NOTE_STATS_FILE)


class NoteStats:
    """The statistics loaded for a run: note id -> (log q, known positives' hashes)."""

    def __init__(self, path: str, logq: bool, known: bool, max_known: int = MAX_KNOWN):
        import pandas as pd

        if not os.path.exists(path):
            raise NoteStatsError(f"{path}: no note statistics beside the training shards; write the shards again "
                                 "with `notellm2 data write-shards` (it writes note_stats.parquet from the training "
                                 "pairs), or set loss.logq_correction and loss.mask_known_positives to false")
        try:
            df = pd.read_parquet(path)
        except Exception as e:  # noqa: BLE001 - any unreadable file gets one clear line
            raise NoteStatsError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
        missing = [c for c in ("note_id", "appearances", "q", "known") if c not in df.columns]
        if missing:
            raise NoteStatsError(f"{path}: missing column(s) {', '.join(missing)}")
        total = int(df["appearances"].sum())
        if total <= 0 or (df["q"] <= 0).any():
            raise NoteStatsError(f"{path}: every note needs appearances > 0 and q > 0")
        self.path, self.use_logq, self.use_known = path, bool(logq), bool(known)
        self.floor_logq = math.log(1.0 / total)  # one appearance of 2P
        self.max_known = int(max_known)
        self._logq = dict(zip(df["note_id"], np.log(df["q"].to_numpy(dtype=np.float64))))
        self._known = {n: [note_id_hash(x) for x in list(k)[: self.max_known]] for n, k in zip(df["note_id"], df["known"])}
        self.num_notes = len(df)

    def logq(self, note_id: str) -> float:
        return self._logq.get(note_id, self.floor_logq)

    def known(self, note_id: str) -> list[int]:
        return self._known.get(note_id, [])

    def annotate(self, batch: dict) -> dict:
        """`batch` with sample_logq [N] and/or known_pos [N, K] (see the module docstring); padding rows
        (note_ids -1) get the floor and no known positive."""
        ids = batch["note_id_strs"]
        real = batch["note_ids"] >= 0
        if self.use_logq:
            batch["sample_logq"] = torch.tensor([self.logq(n) if r else self.floor_logq
                                                 for n, r in zip(ids, real.tolist())], dtype=torch.float32)
        if self.use_known:
            lists = [self.known(n) if r else [] for n, r in zip(ids, real.tolist())]
            k = max(1, max((len(x) for x in lists), default=0))
            out = torch.full((len(ids), k), KNOWN_PAD, dtype=torch.long)
            for i, x in enumerate(lists):
                if x:
                    out[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            batch["known_pos"] = out
        return batch


def load_for_run(shard_paths: list[str], logq: bool, known: bool) -> Optional[NoteStats]:
    """The statistics for a run's training (and validation) batches, or None when neither option is on."""
    if not (logq or known):
        return None
    return NoteStats(stats_path_for(shard_paths), logq, known)
