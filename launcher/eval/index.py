"""The persisted search index and the related-notes table it keeps (`notellm2 index build|update`), and
the one-shot table of `notellm2 neighbors`. The daily loop and its figures: docs/new_notes.md.

An index folder (one folder per version; `update` writes a new one and leaves the old one whole):

    manifest.json     format, version, fingerprint, mode, backend and its parameters, k, reserve,
                      drop_duplicates, counts, the embedding set and the previous version it came from
    ids.txt           the notes, in row order (one id a line)
    labels.npy        int64 [N]: each row's label, ascending; a note keeps its label until its content
                      changes (then it is removed and added again under a new label)
    hashes.npy        uint8 [N, 16]: the notes' content hashes (notellm2.data_shards.reader.content_hash)
    vectors.npy       exact backend: the L2-normalised grid vectors (launcher/eval/ranked.py), float32 [N, d]
    faiss.index       faiss backends: an IVF-Flat or IVF-PQ index over the same vectors, ids = labels
    neighbors.npy     int64 [N, k + r]: each note's list (labels of its nearest notes, -1 padded)
    scores.npy        float32 [N, k + r]: their canonical cosine scores (-inf padded)
    complete.npy      bool [N]: the list holds every note it may hold (small pools)
    related.parquet   the served table: note_id, neighbor_id, rank (1 = nearest), score; top k

The order of every list is score descending, then note id ascending; scores are canonical (ranked.py),
so an exact table is a function of the vectors alone.

The reserve: each list keeps k + r entries (r = `--reserve`, default max(5, ceil(k / 5))). An update
removes the deleted and changed notes from every list; a list left with fewer than k entries is
searched again; the others stay exact prefixes of the true order, because removing notes from a pool
keeps the rest of a sorted list sorted and complete up to its last entry. New and changed notes get a
fresh search; an existing note's list gets a new note inserted at its rank when it comes before the
list's last entry (exact backend: every existing note is checked against every new note, a
[N, new] matrix product; faiss: through the new note's own search, by symmetry), then is cut to k + r.
So an exact update equals a rebuild from scratch on its first k entries (tested), and the reserve
makes a re-search rare: a list must lose r + 1 entries (net) before it needs one.

HNSW cannot remove vectors, so it is no index backend; `neighbors` still offers it for one-shot tables.
"""
from __future__ import annotations

import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from notellm2.errors import UserError
from notellm2.files import atomic_write_json, commit_dir, commit_file, sha256_file, temporary_name
from notellm2.launcher.eval.ranked import (MARGIN, PoolKeys, finish_lists, pool_keys, ranked_topk, reverse_insertions,
                                           to_grid)
from notellm2.launcher.eval.search_parts import SearchParts

INDEX_FORMAT = "notellm2-index"
FORMAT_VERSION = 1
INDEX_BACKENDS = ("exact", "faiss-ivf", "faiss-ivfpq")
NEIGHBOR_BACKENDS = ("exact", "faiss-ivf", "faiss-ivfpq", "faiss-hnsw")
REVERSE_ROWS = 4096  # existing notes per reverse-insertion part
SERVED = "related.parquet"
SEARCH_COLLECTIVE_TIMEOUT_S = 1800


class SearchIndexError(UserError, ValueError):
    """An index folder or settings the command refuses (one line)."""


def default_reserve(k: int) -> int:
    return max(5, math.ceil(k / 5))


@dataclass
class TableSettings:
    k: int
    reserve: int
    drop_duplicates: bool = False
    backend: str = "exact"
    nlist: Optional[int] = None  # faiss: inverted lists (default min(n / 39, 4 sqrt(n)))
    nprobe: int = 16
    pq_m: Optional[int] = None  # faiss-ivfpq: sub-quantisers (default d / 4), 8 bits each
    seed: int = 0

    @property
    def width(self) -> int:
        return self.k + self.reserve


@dataclass
class Pool:
    ids: list
    labels: np.ndarray  # int64 [N], ascending
    hashes: np.ndarray  # uint8 [N, 16]
    vectors: np.ndarray  # float32 [N, d] grid vectors
    keys: PoolKeys

    @classmethod
    def of(cls, ids, labels, hashes, vectors) -> "Pool":
        return cls(list(ids), np.asarray(labels, np.int64), np.asarray(hashes, np.uint8), vectors,
                   pool_keys(np.asarray(ids, dtype=str), hashes))

    def rows_of(self, labels: np.ndarray) -> np.ndarray:
        """Pool rows of `labels` (-1 stays -1); every other label must be in the pool."""
        lab = np.asarray(labels, np.int64)
        rows = np.searchsorted(self.labels, np.where(lab >= 0, lab, 0))
        return np.where(lab >= 0, rows, -1)


# ----------------------------------------------------------------------------- inputs

@dataclass
class EmbeddingSet:
    folder: str
    ids: list
    vectors: np.ndarray  # grid vectors
    hashes: np.ndarray
    fingerprint: Optional[str]
    mode: Optional[str]
    info_sha256: str


def load_set(emb_dir: str, need_hashes: bool) -> EmbeddingSet:
    """An embedding folder as grid vectors; without content hashes (an old set, allowed only where
    `need_hashes` is False) every note is its own duplicate group."""
    from notellm2.launcher.eval.evaluate import load_embeddings
    from notellm2.launcher.eval.provenance import read_set_source

    ids, emb = load_embeddings(emb_dir)
    if len(set(ids)) != len(ids):
        raise SearchIndexError(f"{emb_dir}: the embeddings hold duplicate note ids")
    source = read_set_source(emb_dir, need_hashes=need_hashes)
    hashes = source.hashes
    if hashes is None:
        hashes = np.zeros((len(ids), 16), np.uint8)
        hashes[:, :8] = np.arange(len(ids), dtype=np.int64).view(np.uint8).reshape(len(ids), 8)
    return EmbeddingSet(emb_dir, ids, to_grid(emb.numpy()), hashes, source.fingerprint, source.mode,
                        sha256_file(os.path.join(emb_dir, "embeddings.json")))


# ----------------------------------------------------------------------------- faiss

def _faiss():
    from notellm2.errors import require

    return require("faiss", "faiss")


def build_faiss(pool: Pool, st: TableSettings):
    """An IVF-Flat / IVF-PQ (inner product) index over the pool's vectors, ids = labels; or HNSW-Flat
    (`neighbors` only: ids = rows)."""
    from notellm2.launcher.eval.search import faiss_index

    if st.backend == "faiss-hnsw":
        return faiss_index(pool.vectors, "faiss-hnsw")
    faiss = _faiss()
    n, d = pool.vectors.shape
    nlist = st.nlist or max(1, min(n // 39, int(4 * np.sqrt(n))))
    quantizer = faiss.IndexFlatIP(d)
    if st.backend == "faiss-ivf":
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        train_n = 64 * nlist
    elif st.backend == "faiss-ivfpq":
        m = st.pq_m or max(1, d // 4)
        if d % m:
            raise SearchIndexError(f"--pq-m {m}: must divide the vectors' dimension {d}")
        nbits = int(min(8, max(1, math.floor(math.log2(max(2, n))))))
        index = faiss.IndexIVFPQ(quantizer, d, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT)
        train_n = max(64 * nlist, 256 * 39)
    else:
        raise SearchIndexError(f"--backend {st.backend}: allowed {', '.join(NEIGHBOR_BACKENDS)}")
    rng = np.random.default_rng(st.seed)
    x = pool.vectors
    index.train(x if n <= train_n else x[np.sort(rng.choice(n, train_n, replace=False))])
    index.add_with_ids(x, pool.labels)
    index.nprobe = min(st.nprobe, nlist)
    return index


def faiss_lists(index, pool: Pool, rows: np.ndarray, st: TableSettings) -> tuple[np.ndarray, np.ndarray]:
    """The lists of pool `rows` through faiss: candidates from the index, canonical scores and order."""
    if not len(rows):
        return np.zeros((0, st.width), np.int64), np.zeros((0, st.width), np.float32)
    own = pool.keys.group_size[rows]
    fetch = int(min(len(pool.ids), st.width + int(own.max()) + MARGIN))
    if st.backend == "faiss-hnsw":
        index.hnsw.efSearch = max(index.hnsw.efSearch, fetch)
    _, got = index.search(np.ascontiguousarray(pool.vectors[rows]), fetch)
    cand = got if st.backend == "faiss-hnsw" else pool.rows_of(got)
    return finish_lists(pool.vectors[rows], rows, pool.keys.group[rows], cand, pool.vectors, pool.keys, st.width,
                        st.drop_duplicates)


# ----------------------------------------------------------------------------- the search stages

def start_parts(work: str, settings: dict, restart: bool) -> SearchParts:
    """Every rank: refuse parts of other settings (before the process group starts), start the group
    under torchrun / srun, and (rank 0) prepare the parts folder."""
    from notellm2.launcher import distributed

    topo = distributed.detect_topology()
    parts = SearchParts(work, settings, topo.rank, topo.world_size)
    parts.check(restart)
    if topo.world_size > 1:
        distributed.init_distributed(topo, timeout_s=SEARCH_COLLECTIVE_TIMEOUT_S, deepspeed_comm=False)
    parts.prepare(restart)
    _barrier()
    return parts


def shared_faiss(parts: SearchParts, make):
    """One faiss index for every rank: rank 0 builds it (`make()`) into the parts folder unless a killed
    run left it there; the others read it after a barrier (ranks with other thread counts could train
    other clusters)."""
    faiss = _faiss()
    path = os.path.join(parts.work, "faiss.index")
    if parts.rank == 0 and not os.path.exists(path):
        tmp = temporary_name(path)
        faiss.write_index(make(), tmp)
        commit_file(tmp, path)
    _barrier()
    return faiss.read_index(path)


def _barrier() -> None:
    from notellm2.launcher import distributed

    distributed.barrier()


def _bar(total: int, desc: str, rank: int):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="chunk", file=sys.stderr, disable=rank != 0)


def search_rows(parts: SearchParts, pool: Pool, rows: np.ndarray, st: TableSettings, chunk: int, index=None,
                stage: str = "search", log=print) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every rank: the lists of pool `rows` (chunks of `chunk` rows across the ranks, as parts); after a
    barrier rank 0 gets (rows [n, K], scores [n, K], complete [n]) in the order of `rows` (others: None)."""
    import torch

    n_chunks = (len(rows) + chunk - 1) // chunk
    pool_tensor = torch.from_numpy(pool.vectors) if index is None else None
    stats: dict = {}

    def one(c: int) -> dict:
        r = rows[c * chunk:(c + 1) * chunk]
        if index is None:
            nbr, sc, comp = ranked_topk(pool.vectors[r], r, pool.keys.group[r], pool.vectors, pool.keys, st.width,
                                        st.drop_duplicates, pool_tensor, stats)
        else:
            nbr, sc = faiss_lists(index, pool, r, st)
            comp = np.zeros(len(r), bool)
        return {"rows": nbr, "scores": sc, "complete": comp}

    with _bar(n_chunks, stage, parts.rank) as bar:
        got = parts.run(stage, n_chunks, one, progress=lambda c: bar.update(min(parts.world_size, n_chunks - c)))
    if got["resumed"]:
        log(f"rank {parts.rank}: {stage}: resumed, {got['resumed']} parts done, {got['done']} computed")
    if stats.get("canonical_scans"):
        log(f"rank {parts.rank}: {stage}: {stats['canonical_scans']} queries needed a canonical scan (near-ties)")
    _barrier()
    if parts.rank != 0:
        return None, None, None
    out = [parts.read(stage, c) for c in range(n_chunks)]
    width = st.width
    if not out:
        return np.zeros((0, width), np.int64), np.zeros((0, width), np.float32), np.zeros(0, bool)
    return (np.concatenate([o["rows"] for o in out]), np.concatenate([o["scores"] for o in out]),
            np.concatenate([o["complete"] for o in out]))


RECALL_SAMPLE = 1000


def recall_vs_exact(pool: Pool, nbr_rows: np.ndarray, st: TableSettings) -> tuple[float, int]:
    """(mean fraction of the exact top k that a faiss table's top k holds, notes sampled): up to
    RECALL_SAMPLE notes, drawn with a fixed seed; printed whenever a faiss backend is used."""
    from notellm2.launcher.eval.search import overlap_recall

    sample = np.sort(np.random.default_rng(0).permutation(len(pool.ids))[:RECALL_SAMPLE])
    exact, _, _ = ranked_topk(pool.vectors[sample], sample, pool.keys.group[sample], pool.vectors, pool.keys, st.k,
                              st.drop_duplicates)
    return overlap_recall(nbr_rows[sample, :st.k], exact), len(sample)


# ----------------------------------------------------------------------------- writing

def write_served(path: str, pool: Pool, nbr_rows: np.ndarray, scores: np.ndarray, k: int, block: int = 65536) -> int:
    """The served table (top k of each list) as parquet at `path` (a temporary name, then moved into
    place); returns the rows written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("note_id", pa.string()), ("neighbor_id", pa.string()), ("rank", pa.int32()),
                        ("score", pa.float32())])
    ids = pa.array(pool.ids, pa.string())
    rank_col = np.tile(np.arange(1, k + 1, dtype=np.int32), min(block, max(1, len(pool.ids))))
    tmp = temporary_name(path)
    rows = 0
    try:
        with pq.ParquetWriter(tmp, schema) as w:
            for s in range(0, len(pool.ids), block):
                nb = nbr_rows[s:s + block, :k]
                keep = (nb >= 0).reshape(-1)
                note = np.repeat(np.arange(s, s + len(nb)), k)[keep]
                w.write_table(pa.table({"note_id": ids.take(note), "neighbor_id": ids.take(nb.reshape(-1)[keep]),
                                        "rank": rank_col[:len(nb) * k][keep],
                                        "score": scores[s:s + block, :k].reshape(-1)[keep]}, schema=schema))
                rows += int(keep.sum())
        commit_file(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return rows


def write_index(out_dir: str, pool: Pool, nbr_rows: np.ndarray, scores: np.ndarray, complete: np.ndarray,
                st: TableSettings, manifest: dict, faiss_index=None) -> dict:
    """The whole folder under a temporary name beside `out_dir`, manifest.json last, then moved into
    place at once (notellm2.files.commit_dir): a reader sees the old state or the whole new version."""
    out_dir = os.path.abspath(out_dir)
    tmp = temporary_name(out_dir)
    if os.path.isdir(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    try:
        with open(os.path.join(tmp, "ids.txt"), "w", encoding="utf-8") as fh:
            fh.write("".join(f"{n}\n" for n in pool.ids))
        np.save(os.path.join(tmp, "labels.npy"), pool.labels)
        np.save(os.path.join(tmp, "hashes.npy"), pool.hashes)
        if faiss_index is None:
            np.save(os.path.join(tmp, "vectors.npy"), pool.vectors)
        else:
            _faiss().write_index(faiss_index, os.path.join(tmp, "faiss.index"))
        np.save(os.path.join(tmp, "neighbors.npy"), np.where(nbr_rows >= 0, pool.labels[np.maximum(nbr_rows, 0)], -1))
        np.save(os.path.join(tmp, "scores.npy"), scores.astype(np.float32))
        np.save(os.path.join(tmp, "complete.npy"), complete.astype(bool))
        served = write_served(os.path.join(tmp, SERVED), pool, nbr_rows, scores, st.k)
        if faiss_index is not None:
            recall, n = recall_vs_exact(pool, nbr_rows, st)
            manifest = {**manifest, "recall_vs_exact": {"recall": round(recall, 4), "notes": n, "k": st.k}}
            print(f"[index] {st.backend} recall@{st.k} against exact search on {n} notes: {recall:.4f}",
                  file=sys.stderr, flush=True)
        index_bytes = os.path.getsize(os.path.join(tmp, "vectors.npy" if faiss_index is None else "faiss.index"))
        manifest = {"format": INDEX_FORMAT, "format_version": FORMAT_VERSION, **manifest,
                    "settings": {**asdict(st), "width": st.width, "dim": int(pool.vectors.shape[1])},
                    "counts": {**manifest.get("counts", {}), "notes": len(pool.ids), "served_rows": served,
                               "short_lists": int(((nbr_rows[:, :st.k] < 0).any(1) & ~complete).sum())},
                    "next_label": int(pool.labels.max(initial=-1)) + 1, "index_bytes": index_bytes}
        atomic_write_json(os.path.join(tmp, "manifest.json"), manifest, indent=1, sort_keys=True)
        commit_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


# ----------------------------------------------------------------------------- reading

@dataclass
class Index:
    folder: str
    manifest: dict
    settings: TableSettings
    pool: Pool
    neighbors: np.ndarray  # labels [N, K]
    scores: np.ndarray
    complete: np.ndarray
    faiss_index: object = None


def read_index(folder: str) -> Index:
    from notellm2.launcher.eval.provenance import read_json

    path = os.path.join(folder, "manifest.json")
    manifest = read_json(path, "not a finished `notellm2 index build|update` folder", SearchIndexError)
    if not isinstance(manifest, dict) or manifest.get("format") != INDEX_FORMAT:
        raise SearchIndexError(f"{path}: not a notellm2 index manifest (format {manifest.get('format')!r})")
    raw = dict(manifest["settings"])
    st = TableSettings(**{k: raw[k] for k in TableSettings.__dataclass_fields__})
    with open(os.path.join(folder, "ids.txt"), encoding="utf-8") as fh:
        ids = [line.rstrip("\n") for line in fh]
    labels = np.load(os.path.join(folder, "labels.npy"))
    hashes = np.load(os.path.join(folder, "hashes.npy"))
    vectors, fi = None, None
    if st.backend == "exact":
        vectors = np.load(os.path.join(folder, "vectors.npy"))
    else:
        fi = _faiss().read_index(os.path.join(folder, "faiss.index"))
    pool = Pool(ids, labels, hashes, vectors, None)  # keys: of the new pool, in update
    return Index(folder, manifest, st, pool, np.load(os.path.join(folder, "neighbors.npy"), mmap_mode="r"),
                 np.load(os.path.join(folder, "scores.npy"), mmap_mode="r"), np.load(os.path.join(folder, "complete.npy")),
                 fi)


# ----------------------------------------------------------------------------- build

def _check_out(out_dir: str) -> None:
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise SearchIndexError(f"--out {out_dir}: exists; each version goes to a new folder (keep the previous one to "
                          "roll back to)")


def build_command(emb_dir: str, out_dir: str, st: TableSettings, chunk: int = 4096, restart: bool = False) -> int:
    """`notellm2 index build`: every rank runs it."""
    if st.backend not in INDEX_BACKENDS:
        raise SearchIndexError(f"--backend {st.backend}: an index must remove vectors; allowed {', '.join(INDEX_BACKENDS)} "
                          "(HNSW cannot remove them: use it through `notellm2 neighbors`)")
    _check_settings(st, chunk)
    _check_out(out_dir)
    t0 = time.time()
    emb = load_set(emb_dir, need_hashes=True)
    _check_k(st, len(emb.ids))
    parts = start_parts(_work(out_dir), {"command": "index build", "embeddings": [os.path.abspath(emb_dir),
                                                                                  emb.info_sha256],
                                         "settings": asdict(st), "chunk": chunk}, restart)
    pool = Pool.of(emb.ids, np.arange(len(emb.ids)), emb.hashes, emb.vectors)
    index = shared_faiss(parts, lambda: build_faiss(pool, st)) if st.backend != "exact" else None
    nbr, scores, complete = search_rows(parts, pool, np.arange(len(pool.ids)), st, chunk, index)
    if parts.rank == 0:
        m = write_index(out_dir, pool, nbr, scores, complete, st,
                        {"version": 1, "fingerprint": emb.fingerprint, "mode": emb.mode,
                         "embeddings": {"folder": os.path.abspath(emb_dir), "sha256": emb.info_sha256},
                         "previous": None, "counts": {"added": len(pool.ids)}}, index)
        parts.remove()
        print(f"index build: {len(pool.ids)} notes, {st.backend}, lists of {st.k} + {st.reserve} -> "
              f"{os.path.abspath(out_dir)} (version 1, {m['counts']['served_rows']} served rows) in "
              f"{time.time() - t0:.1f} s", flush=True)
    return 0


def _work(out: str) -> str:
    from notellm2.launcher.eval.search_parts import work_dir_for

    return work_dir_for(out)


def _check_settings(st: TableSettings, chunk: int) -> None:
    if st.k < 1 or st.reserve < 0 or chunk < 1:
        raise SearchIndexError(f"--k {st.k}, --reserve {st.reserve}, --chunk {chunk}: need k >= 1, reserve >= 0, chunk >= 1")


def _check_k(st: TableSettings, n: int) -> None:
    if not 1 <= st.k <= n - 1:
        raise SearchIndexError(f"--k {st.k}: must be between 1 and the number of notes minus one ({n - 1})")


# ----------------------------------------------------------------------------- update

@dataclass
class UpdatePlan:
    pool: Pool
    survivors: np.ndarray  # old rows kept, in order (they are new rows 0 .. len - 1)
    added: np.ndarray  # new rows of new and changed notes
    removed_labels: np.ndarray
    nbr_rows: np.ndarray  # [len(survivors), K] the survivors' lists after the removals (new rows, -1 padded)
    scores: np.ndarray
    complete: np.ndarray
    research: np.ndarray  # survivor rows whose list fell below k
    counts: dict


def plan_update(old: Index, emb: EmbeddingSet) -> UpdatePlan:
    """Diff the index against the new embedding set: who stays, who is removed, who is added; the
    survivors' lists without the removed notes."""
    st = old.settings
    pos = {n: i for i, n in enumerate(emb.ids)}
    old_ids = old.pool.ids
    new_row = np.array([pos.get(n, -1) for n in old_ids], np.int64)
    from notellm2.data_shards.reader.content_hash import hash_keys

    same = new_row >= 0
    same[same] = hash_keys(old.pool.hashes[same]) == hash_keys(emb.hashes[new_row[same]])
    survivors = np.flatnonzero(same)
    keep_ids = set(old_ids[i] for i in survivors)
    added_src = np.array([i for i, n in enumerate(emb.ids) if n not in keep_ids], np.int64)
    if st.backend == "exact":
        moved = ~np.all(old.pool.vectors[survivors] == emb.vectors[new_row[survivors]], axis=1)
        if moved.any():
            first = old_ids[survivors[np.flatnonzero(moved)[0]]]
            raise SearchIndexError(f"{emb.folder}: {int(moved.sum())} notes keep their content hash but have other vectors "
                              f"(first: {first}); the set was not made from the index's set by `embed --base`: "
                              "build the index again")
    next_label = int(old.manifest.get("next_label", int(old.pool.labels.max(initial=-1)) + 1))
    ids = [old_ids[i] for i in survivors] + [emb.ids[i] for i in added_src]
    labels = np.concatenate([old.pool.labels[survivors], next_label + np.arange(len(added_src))])
    hashes = np.concatenate([old.pool.hashes[survivors], emb.hashes[added_src]])
    vectors = np.concatenate([emb.vectors[new_row[survivors]], emb.vectors[added_src]])
    pool = Pool.of(ids, labels, hashes, vectors)
    removed = np.setdiff1d(old.pool.labels, old.pool.labels[survivors])
    lab = np.asarray(old.neighbors[survivors])
    sc = np.asarray(old.scores[survivors])
    valid = (lab >= 0) & ~np.isin(lab, removed)
    order = np.argsort(~valid, axis=1, kind="stable")  # compact: the kept entries first, in their order
    lab, sc, valid = (np.take_along_axis(a, order, 1) for a in (lab, sc, valid))
    nbr_rows = np.where(valid, pool.rows_of(np.where(valid, lab, -1)), -1)
    sc = np.where(valid, sc, -np.inf).astype(np.float32)
    complete = old.complete[survivors]
    research = np.flatnonzero((valid.sum(1) < st.k) & ~complete)
    n_changed = int(((new_row >= 0) & ~same).sum())
    counts = {"kept": len(survivors), "added": len(added_src) - n_changed, "changed": n_changed,
              "removed": int(len(old_ids) - len(survivors) - n_changed), "re_searched": len(research)}
    return UpdatePlan(pool, survivors, len(survivors) + np.arange(len(added_src)), removed, nbr_rows, sc, complete,
                      research, counts)


def merge_lists(nbr_rows: np.ndarray, scores: np.ndarray, at: np.ndarray, ins_rows: np.ndarray,
                ins_scores: np.ndarray, keys: PoolKeys, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Insert (row `at[i]` of the table gets pool row `ins_rows[i]` with `ins_scores[i]`) and keep each
    touched list's first `width` entries in the total order. Returns the new (rows, scores) and a mask of
    the lists that overflowed (were cut)."""
    nbr_rows, scores = nbr_rows.copy(), scores.copy()
    cut = np.zeros(len(nbr_rows), bool)
    if not len(at):
        return nbr_rows, scores, cut
    touched = np.unique(at)
    slot = np.searchsorted(touched, at)
    ex_r, ex_s = nbr_rows[touched], scores[touched]
    valid = ex_r >= 0
    line = np.concatenate([np.repeat(np.arange(len(touched)), width)[valid.reshape(-1)], slot])
    rows = np.concatenate([ex_r[valid], ins_rows])
    sc = np.concatenate([ex_s[valid], ins_scores]).astype(np.float32)
    idx = np.lexsort((keys.order[rows], -sc.astype(np.float64), line))
    line, rows, sc = line[idx], rows[idx], sc[idx]
    start = np.searchsorted(line, np.arange(len(touched)))
    rank = np.arange(len(line)) - start[line]
    keep = rank < width
    new_r = np.full((len(touched), width), -1, np.int64)
    new_s = np.full((len(touched), width), -np.inf, np.float32)
    new_r[line[keep], rank[keep]] = rows[keep]
    new_s[line[keep], rank[keep]] = sc[keep]
    nbr_rows[touched], scores[touched] = new_r, new_s
    cut[touched] = np.bincount(line, minlength=len(touched)) > width
    return nbr_rows, scores, cut


def update_command(index_dir: str, emb_dir: str, out_dir: str, chunk: int = 4096, restart: bool = False) -> int:
    """`notellm2 index update`: every rank runs it."""
    from notellm2.launcher.eval.provenance import require_same_source

    _check_out(out_dir)
    if chunk < 1:
        raise SearchIndexError(f"--chunk {chunk}: must be >= 1")
    t0 = time.time()
    old = read_index(index_dir)
    st = old.settings
    emb = load_set(emb_dir, need_hashes=True)
    require_same_source([(f"index {index_dir}", old.manifest.get("fingerprint"), old.manifest.get("mode")),
                         (f"embeddings {emb_dir}", emb.fingerprint, emb.mode)])
    _check_k(st, len(emb.ids))
    plan = plan_update(old, emb)
    pool = plan.pool
    parts = start_parts(_work(out_dir), {"command": "index update",
                                         "index": [os.path.abspath(index_dir),
                                                   sha256_file(os.path.join(index_dir, "manifest.json"))],
                                         "embeddings": [os.path.abspath(emb_dir), emb.info_sha256], "chunk": chunk},
                        restart)
    index = None
    if old.faiss_index is not None:
        def updated():
            fi = old.faiss_index
            fi.remove_ids(np.ascontiguousarray(plan.removed_labels, np.int64))
            if len(plan.added):
                fi.add_with_ids(np.ascontiguousarray(pool.vectors[plan.added]), pool.labels[plan.added])
            return fi

        index = shared_faiss(parts, updated)
    queries = np.concatenate([plan.research, plan.added])  # survivors keep their row numbers
    q_rows, q_scores, q_complete = search_rows(parts, pool, queries, st, chunk, index)
    # the existing lists a new note enters (exact: all of them are checked)
    checked = np.setdiff1d(np.arange(len(plan.survivors)), plan.research)
    last = np.maximum((plan.nbr_rows[checked] >= 0).sum(1) - 1, 0)
    tau_rows = plan.nbr_rows[checked, last]
    tau_score = np.where(tau_rows >= 0, plan.scores[checked, last], -np.inf).astype(np.float32)
    tau_order = np.where(tau_rows >= 0, pool.keys.order[np.maximum(tau_rows, 0)], -1)
    ins = None
    if index is None:
        n_rev = (len(checked) + REVERSE_ROWS - 1) // REVERSE_ROWS

        def reverse(c: int) -> dict:
            sl = slice(c * REVERSE_ROWS, (c + 1) * REVERSE_ROWS)
            r, a, s = reverse_insertions(checked[sl], pool.vectors, pool.keys, tau_score[sl], tau_order[sl],
                                         plan.complete[checked[sl]], plan.added, st.drop_duplicates)
            return {"row": r, "new": a, "score": s}

        with _bar(n_rev, "reverse", parts.rank) as bar:
            parts.run("reverse", n_rev, reverse, progress=lambda c: bar.update(min(parts.world_size, n_rev - c)))
        _barrier()
        if parts.rank == 0:
            got = [parts.read("reverse", c) for c in range(n_rev)]
            ins = tuple(np.concatenate([g[k] for g in got]) if got else np.zeros(0) for k in ("row", "new", "score"))
    if parts.rank == 0:
        nbr, scores, complete = plan.nbr_rows, plan.scores, plan.complete.copy()
        if ins is None:  # faiss: by symmetry, from the new notes' own lists
            ins = _symmetric_insertions(q_rows[len(plan.research):], q_scores[len(plan.research):], plan.added,
                                        checked, tau_score, tau_order, plan.complete, pool.keys, st.drop_duplicates)
        nbr, scores, cut = merge_lists(nbr, scores, ins[0].astype(np.int64), ins[1].astype(np.int64),
                                       ins[2].astype(np.float32), pool.keys, st.width)
        complete &= ~cut
        nbr = np.concatenate([nbr, q_rows[len(plan.research):]])
        scores = np.concatenate([scores, q_scores[len(plan.research):]])
        complete = np.concatenate([complete, q_complete[len(plan.research):]])
        nbr[plan.research], scores[plan.research] = q_rows[:len(plan.research)], q_scores[:len(plan.research)]
        complete[plan.research] = q_complete[:len(plan.research)]
        counts = {**plan.counts, "insertions": int(len(ins[0]))}
        version = int(old.manifest.get("version", 0)) + 1
        m = write_index(out_dir, pool, nbr, scores, complete, st,
                        {"version": version, "fingerprint": emb.fingerprint, "mode": emb.mode,
                         "embeddings": {"folder": os.path.abspath(emb_dir), "sha256": emb.info_sha256},
                         "previous": {"folder": os.path.abspath(index_dir), "version": version - 1},
                         "counts": counts}, index)
        parts.remove()
        print(f"index update: version {version}: {len(pool.ids)} notes ({counts['kept']} kept, {counts['added']} added, "
              f"{counts['changed']} changed, {counts['removed']} removed); {counts['insertions']} insertions into "
              f"existing lists, {counts['re_searched']} lists searched again -> {os.path.abspath(out_dir)} "
              f"({m['counts']['served_rows']} served rows) in {time.time() - t0:.1f} s", flush=True)
    return 0


def _symmetric_insertions(a_rows, a_scores, added, checked, tau_score, tau_order, complete, keys, drop):
    """faiss: new note a enters the list of an existing note n found in a's own list, when it comes
    before n's last entry (the score is symmetric)."""
    pos = np.full(int(checked.max(initial=-1)) + 1, -1, np.int64)
    pos[checked] = np.arange(len(checked))
    a_idx, j = np.nonzero(a_rows >= 0)
    n = a_rows[a_idx, j]
    inside = n < len(pos)
    a_idx, j, n = a_idx[inside], j[inside], n[inside]
    slot = pos[n]
    ok = slot >= 0
    a_idx, j, n, slot = a_idx[ok], j[ok], n[ok], slot[ok]
    a = added[a_idx]
    s = a_scores[a_idx, j]
    before = complete[n] | (s > tau_score[slot]) | ((s == tau_score[slot]) & (keys.order[a] < tau_order[slot]))
    if drop:
        before &= keys.group[n] != keys.group[a]
    return n[before], a[before], s[before]


# ----------------------------------------------------------------------------- neighbors (one-shot table)


def neighbors_command(emb_dir: str, out: str, k: int, backend: str = "exact", chunk: int = 4096,
                      restart: bool = False) -> int:
    """`notellm2 neighbors`: each note's top k as a parquet table, on one or several ranks (every rank
    runs it; the output equals one rank's). With a faiss backend, rank 0 then prints the table's overlap
    with exact search on up to 1,000 sampled notes."""
    if backend not in NEIGHBOR_BACKENDS:
        raise SearchIndexError(f"--backend {backend}: allowed {', '.join(NEIGHBOR_BACKENDS)}")
    if chunk < 1:
        raise SearchIndexError(f"--chunk {chunk}: must be >= 1")
    emb = load_set(emb_dir, need_hashes=False)
    st = TableSettings(k=k, reserve=0, backend=backend)
    _check_k(st, len(emb.ids))
    parts = start_parts(_work(out), {"command": "neighbors", "embeddings": [os.path.abspath(emb_dir), emb.info_sha256],
                                     "settings": asdict(st), "chunk": chunk}, restart)
    pool = Pool.of(emb.ids, np.arange(len(emb.ids)), emb.hashes, emb.vectors)
    index = shared_faiss(parts, lambda: build_faiss(pool, st)) if backend != "exact" else None
    nbr, scores, _ = search_rows(parts, pool, np.arange(len(pool.ids)), st, chunk, index, stage="neighbors")
    if parts.rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        rows = write_served(out, pool, nbr, scores, k)
        parts.remove()
        if index is not None:
            recall, n = recall_vs_exact(pool, nbr, st)
            print(f"[neighbors] {backend} recall@{k} against exact search on {n} notes: {recall:.4f}",
                  file=sys.stderr, flush=True)
        print(f"wrote {out}: {rows} rows ({len(pool.ids)} notes x top {k}, {backend})", flush=True)
    return 0
