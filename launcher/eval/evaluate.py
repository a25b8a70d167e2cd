"""I2I Recall@K (NoteLLM / NoteLLM-2): the protocols, the subsets and the bootstrap intervals.

Two protocols (docs/evaluation.md):

- ``paper`` (the default): the test notes are the notes the split assigned to test
  (note_split.parquet). The test pairs are read in file order; a pair is kept only when both notes
  are test notes and neither was already used as a query or a target of a kept pair, so every
  note plays at most one role. The queries are the kept query notes; the pool is every test note,
  including notes in no pair, minus the queries. Every test note must have an embedding (a missing
  one is an error naming the run and the notes).
- ``all-pairs`` (the cold-start view, the stack's first protocol): every pair of the split whose
  two notes have embeddings counts; the query ranks every embedded note except itself.

A pair hits at K when fewer than K candidates score at or above its target (ties count against
the target, so a constant encoder scores no better than chance). K values above the pool size are
not reported (at K = pool size every target is found) and are listed as capped.

Subsets beside ``all`` (the same for every run, since they are model-free):
short/long query and target notes by characters of title + content (needs the catalog; the
threshold is the `length_quantile` quantile of the lengths of the evaluated notes, a note at the
threshold is short); cold-start targets (in no training pair); head and tail thirds of the other
targets by their number of training pairs (ties broken by note id).

Every figure gets a bootstrap interval over query notes (default 1,000 resamples at 95 %, seeded;
the same resamples for every run, so runs are compared on the same draws). A resample draws query
notes with replacement and takes all pairs of each (one pair per note under the paper protocol).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from notellm2.launcher.eval import search
from notellm2.errors import UserError
from notellm2.files import commit_file

DEFAULT_KS = (10, 20, 50, 100, 1000, 10_000, 100_000, 1_000_000)
PROTOCOLS = ("paper", "all-pairs")
FAISS_MAX_K = 1000  # an approximate backend reports Recall@K only up to this K


# ---------------------------------------------------------------------------------------- tasks
@dataclass
class Task:
    """What is ranked. Under the paper protocol it is fixed before any embedding is read."""
    protocol: str
    query_ids: list
    target_ids: list
    pool_ids: Optional[list]  # None: every embedded note of a run (all-pairs)
    stats: dict = field(default_factory=dict)


def paper_task(pairs: list[tuple[str, str]], test_notes: list[str]) -> Task:
    """The paper's protocol over the split's pairs in file order (see the module docstring)."""
    test = set(test_notes)
    if len(test) != len(test_notes):
        raise ValueError("paper_task: the test notes hold duplicate ids")
    used: set = set()
    queries, targets = [], []
    not_test = reused = same = 0
    for q, t in pairs:
        if q == t:
            same += 1
        elif q not in test or t not in test:
            not_test += 1
        elif q in used or t in used:
            reused += 1
        else:
            used.update((q, t))
            queries.append(q)
            targets.append(t)
    if not queries:
        raise ValueError(f"paper protocol: none of the {len(pairs)} pairs has two unused test notes "
                         f"({len(test)} test notes)")
    qset = set(queries)
    pool = [n for n in test_notes if n not in qset]
    stats = {"pairs_read": len(pairs), "pairs_kept": len(queries), "dropped_not_both_test": not_test,
             "dropped_note_reused": reused, "dropped_self_pair": same, "test_notes": len(test),
             "pool_notes_in_no_kept_pair": len(pool) - len(targets)}
    return Task("paper", queries, targets, pool, stats)


def all_pairs_task(pairs: list[tuple[str, str]]) -> Task:
    kept = [(q, t) for q, t in pairs if q != t]
    return Task("all-pairs", [q for q, _ in kept], [t for _, t in kept], None,
                {"pairs_read": len(pairs), "dropped_self_pair": len(pairs) - len(kept)})


# -------------------------------------------------------------------------------------- ranking
def _normalise(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=1)


@dataclass
class RunRanks:
    ranks: np.ndarray  # [n] 0-based rank of each evaluated pair's target
    query_ids: list
    target_ids: list
    pool_size: int
    num_skipped: int
    max_k: Optional[int] = None  # approximate backend: ranks >= max_k are unknown (stored as max_k)
    faiss_recall: Optional[float] = None


def rank_run(task: Task, ids: list[str], emb: torch.Tensor, backend: str = "exact", name: str = "",
             image_probe: bool = False, **search_kw) -> RunRanks:
    """`image_probe`: the run is an image-only probe, which has no vector for a note without an image;
    under the paper protocol its pairs with such a note are skipped (counted) and those notes leave
    its pool, instead of the missing-embedding error every other run gets."""
    index = {n: i for i, n in enumerate(ids)}
    if len(index) != len(ids):
        raise ValueError(f"{name}: the embeddings hold duplicate note ids")
    emb = _normalise(emb)
    if task.pool_ids is not None:  # paper: fixed queries and pool
        missing = [n for n in list(task.pool_ids) + list(task.query_ids) if n not in index]
        if missing and not image_probe:
            raise ValueError(f"{name}: {len(missing)} test notes have no embedding (first: "
                             f"{', '.join(missing[:5])}); embed every test note (the notes-test shards)")
        pool_ids = [n for n in task.pool_ids if n in index]
        kept = [(q, t) for q, t in zip(task.query_ids, task.target_ids) if q in index and t in index]
        if not kept:
            raise ValueError(f"{name}: no query and target of the task both have an image-probe vector")
        qids, tids = [q for q, _ in kept], [t for _, t in kept]
        pool = emb[[index[n] for n in pool_ids]]
        queries = emb[[index[n] for n in qids]]
        pos = {n: i for i, n in enumerate(pool_ids)}
        targets = torch.tensor([pos[t] for t in tids], dtype=torch.long)
        exclude, skipped = None, len(task.query_ids) - len(kept)
    else:
        keep = [(q, t) for q, t in zip(task.query_ids, task.target_ids) if q in index and t in index]
        if not keep:
            raise ValueError(f"{name}: none of the {len(task.query_ids)} pairs has both notes embedded")
        qids, tids = [q for q, _ in keep], [t for _, t in keep]
        pool = emb
        exclude = torch.tensor([index[q] for q in qids], dtype=torch.long)
        queries = pool[exclude]
        targets = torch.tensor([index[t] for t in tids], dtype=torch.long)
        skipped = len(task.query_ids) - len(keep)
    pool_size = len(pool) - (1 if exclude is not None else 0)  # candidates per query
    if backend == "exact":
        ranks = search.target_ranks(queries, pool, targets, exclude=exclude, **search_kw).numpy()
        return RunRanks(ranks, qids, tids, pool_size, skipped)
    k = min(FAISS_MAX_K, pool_size)
    _, got = search.search_topk(queries, pool, k, backend=backend, exclude=exclude)
    hit = got == targets[:, None]
    ranks = np.where(hit.any(1).numpy(), hit.float().argmax(1).numpy(), k)
    sample = torch.randperm(len(queries), generator=torch.Generator().manual_seed(0))[:1000]
    _, exact = search.exact_topk(queries[sample], pool, k, exclude=None if exclude is None else exclude[sample])
    return RunRanks(ranks, qids, tids, pool_size, skipped, max_k=k,
                    faiss_recall=search.overlap_recall(got[sample], exact))


# -------------------------------------------------------------------------------------- subsets
def length_subsets(query_ids, target_ids, lengths: dict, quantile: float, notes) -> tuple[dict, float]:
    missing = [n for n in notes if n not in lengths]
    if missing:
        raise ValueError(f"catalog: {len(missing)} evaluated notes are not in it (first: {', '.join(missing[:5])})")
    thr = float(np.quantile([lengths[n] for n in notes], quantile))
    ql = np.array([lengths[n] for n in query_ids])
    tl = np.array([lengths[n] for n in target_ids])
    return {"short_query": ql <= thr, "long_query": ql > thr,
            "short_target": tl <= thr, "long_target": tl > thr}, thr


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


def train_pair_counts(train_pairs: list[tuple[str, str]]) -> dict:
    counts: dict = {}
    for q, t in train_pairs:
        counts[q] = counts.get(q, 0) + 1
        counts[t] = counts.get(t, 0) + 1
    return counts


# ------------------------------------------------------------------------------------ bootstrap
def bootstrap_ci(hits: np.ndarray, resamples: int = 1000, seed: int = 0, level: float = 0.95,
                 groups: Optional[np.ndarray] = None) -> np.ndarray:
    """[nK, 2] percentile interval of each column's hit rate (hits: [n, nK] 0/1) over queries.

    groups: the query note of each row; resampling draws query notes, each with all its pairs (the
    all-pairs protocol has several pairs per query note). Default: one query per row."""
    n = len(hits)
    if n == 0:
        return np.full((hits.shape[1], 2), np.nan)
    if groups is None:
        sums, sizes = hits.astype(np.float64), np.ones(n)
    else:
        _, inv = np.unique(np.asarray(groups), return_inverse=True)
        sums = np.zeros((inv.max() + 1, hits.shape[1]))
        np.add.at(sums, inv, hits.astype(np.float64))
        sizes = np.bincount(inv).astype(np.float64)
    g = len(sizes)
    rng = np.random.default_rng(seed)
    rates = np.empty((resamples, hits.shape[1]))
    step = max(1, 4_000_000 // max(1, g * hits.shape[1]))
    for b in range(0, resamples, step):
        m = min(step, resamples - b)
        idx = rng.integers(0, g, size=(m, g))
        rates[b:b + m] = sums[idx].sum(1) / sizes[idx].sum(1)[:, None]
    a = (1 - level) / 2
    return np.quantile(rates, [a, 1 - a], axis=0).T


def summarise(rr: RunRanks, ks, subsets: dict, resamples: int, seed: int, level: float) -> dict:
    report_ks = [k for k in sorted(set(ks)) if k <= rr.pool_size and (rr.max_k is None or k <= rr.max_k)]
    capped = [k for k in sorted(set(ks)) if k > rr.pool_size]
    approx_dropped = [k for k in sorted(set(ks)) if k <= rr.pool_size and k not in report_ks]
    hits = rr.ranks[:, None] < np.array(report_ks)[None, :]
    out = {}
    for name, mask in {"all": np.ones(len(rr.ranks), dtype=bool), **subsets}.items():
        h = hits[mask]
        groups = np.asarray(rr.query_ids, dtype=object)[mask]
        ci = bootstrap_ci(h, resamples, seed, level, groups=groups) if report_ks else np.zeros((0, 2))
        out[name] = {"n": int(mask.sum()),
                     "recall": {str(k): (float(h[:, j].mean()) if len(h) else None) for j, k in enumerate(report_ks)},
                     "ci": {str(k): [float(ci[j, 0]), float(ci[j, 1])] if len(h) else None
                            for j, k in enumerate(report_ks)}}
    res = {"ks": report_ks, "capped": capped, "subsets": out, "pool_size": rr.pool_size,
           "num_queries": len(rr.ranks), "num_skipped": rr.num_skipped,
           "mean_rank": float(rr.ranks.mean() + 1) if rr.max_k is None else None}
    if approx_dropped:
        res["not_reported_approximate"] = approx_dropped
    if rr.faiss_recall is not None:
        res["faiss_recall_vs_exact"] = rr.faiss_recall
    return res


def evaluate_runs(runs: list[tuple[str, str]], task: Task, ks=DEFAULT_KS, lengths: Optional[dict] = None,
                  length_quantile: float = 0.5, train_counts: Optional[dict] = None, backend: str = "exact",
                  resamples: int = 1000, seed: int = 0, level: float = 0.95, log=print) -> dict:
    """Rank every run (name, embeddings dir) on `task` and summarise all, subsets x K, with intervals."""
    report = {"protocol": task.protocol, "protocol_stats": task.stats, "backend": backend,
              "bootstrap": {"resamples": resamples, "seed": seed, "level": level},
              "subset_rules": {"length": "characters of title + content; short: <= the quantile "
                                         "of the evaluated notes' lengths" if lengths is not None else None,
                               "length_quantile": length_quantile if lengths is not None else None,
                               "popularity": "training-pair appearances of the target; cold_start: 0; head/"
                                             "tail: top/bottom third of the others" if train_counts is not None
                               else None,
                               "split_popularity": "appearances of the target among the evaluated pairs; "
                                                   "pop_head/pop_tail: top/bottom third of the distinct targets"},
              "runs": []}
    for name, emb_dir in runs:
        ids, emb = load_embeddings(emb_dir)
        meta_path = os.path.join(emb_dir, "embeddings.json")
        mode = json.load(open(meta_path)).get("mode") if os.path.exists(meta_path) else None
        rr = rank_run(task, ids, emb, backend=backend, name=f"{name} ({emb_dir})", image_probe=mode == "image")
        subsets = {}
        if lengths is not None:
            notes = sorted(set(rr.query_ids) | set(task.pool_ids if task.pool_ids is not None
                                                   else rr.target_ids))
            ls, thr = length_subsets(rr.query_ids, rr.target_ids, lengths, length_quantile, notes)
            subsets.update(ls)
            report["subset_rules"]["length_threshold_chars"] = thr
        if train_counts is not None:
            subsets.update(popularity_subsets(rr.target_ids, train_counts))
        subsets.update(split_popularity_subsets(rr.query_ids, rr.target_ids))
        res = summarise(rr, ks, subsets, resamples, seed, level)
        if rr.faiss_recall is not None:
            log(f"[eval] {name}: {backend} recall@{rr.max_k} against exact search on "
                f"{min(1000, len(rr.ranks))} queries: {rr.faiss_recall:.4f}")
        report["runs"].append({"name": name, "embeddings": os.path.abspath(emb_dir), **res})
    if len(report["runs"]) == 1:  # the flat keys of the single-run report (scripts read them)
        r = report["runs"][0]
        report.update(recall=r["subsets"]["all"]["recall"], num_pairs=r["num_queries"],
                      num_skipped=r["num_skipped"], pool_size=r["pool_size"], mean_rank=r["mean_rank"])
    return report


# ------------------------------------------------------------------------- the single-set API
@dataclass
class RecallReport:
    recall: dict  # K -> recall
    num_pairs: int
    num_skipped: int  # pairs with a note missing from the pool
    pool_size: int
    mean_rank: float  # 1-based rank of the target, averaged

    def as_dict(self) -> dict:
        return {"recall": {str(k): v for k, v in self.recall.items()}, "num_pairs": self.num_pairs,
                "num_skipped": self.num_skipped, "pool_size": self.pool_size, "mean_rank": self.mean_rank}


def target_ranks(pool: torch.Tensor, query_idx: torch.Tensor, target_idx: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """0-based rank of each pair's target among the pool minus the query itself (all-pairs).
    pool: [P, d] embeddings; query_idx, target_idx: [M] rows of `pool`."""
    q = torch.as_tensor(query_idx, dtype=torch.long)
    return search.target_ranks(pool[q], pool, target_idx, exclude=q, query_chunk=min(chunk, search.QUERY_CHUNK))


def recall_at_k(pool: torch.Tensor, pool_ids: list[str], pairs: list[tuple[str, str]], k_values: list[int]) -> RecallReport:
    """All-pairs Recall@K of one embedding set (no subsets, no intervals)."""
    rr = rank_run(all_pairs_task(pairs), pool_ids, pool, name="recall_at_k")
    skipped = rr.num_skipped + sum(1 for q, t in pairs if q == t)
    recall = {k: float((rr.ranks < k).mean()) for k in sorted(k_values)}
    return RecallReport(recall, len(rr.ranks), skipped, len(pool_ids), float(rr.ranks.mean() + 1))


# ----------------------------------------------------------------------------- embedding files
# Storage dtypes of embeddings.npy (`notellm2 embed --dtype`). The vectors are computed in the model's
# dtype and kept as float32 until written; float16 only halves the file (unit vectors, about 3
# significant digits); readers upcast to float32.
EMBEDDING_DTYPES = ("float32", "float16")


class EmbeddingsError(UserError, ValueError):
    """An embeddings folder that cannot be read as one (one line, naming the file)."""


def _replace_all(pairs: list[tuple[str, str]]) -> None:
    for tmp, final in pairs:
        commit_file(tmp, final)


def save_embedding_chunks(out_dir: str, ids: list[str], dim: int, chunks, meta: dict | None = None,
                          dtype: str = "float32") -> None:
    """Write `embeddings.npy` ([len(ids), dim] in `dtype`), `ids.txt` and `embeddings.json` from `chunks`
    (arrays of rows, in `ids` order) without holding all rows at once: the rows stream into a memory
    map of a temporary file. Each file is written to a temporary name beside it and moved into place
    (`os.replace`), `embeddings.json` last, so a killed writer leaves an old file or a whole new one.
    The bytes are those of `np.save` of the same array."""
    if dtype not in EMBEDDING_DTYPES:
        raise EmbeddingsError(f"embeddings dtype {dtype!r}: allowed {', '.join(EMBEDDING_DTYPES)}")
    os.makedirs(out_dir, exist_ok=True)
    npy, ids_txt, info = (os.path.join(out_dir, n) for n in ("embeddings.npy", "ids.txt", "embeddings.json"))
    shape = (len(ids), int(dim))
    if shape[0] * shape[1] == 0:  # a memory map of nothing cannot be opened
        with open(npy + ".tmp", "wb") as fh:
            np.save(fh, np.zeros(shape, dtype))
    else:
        out = np.lib.format.open_memmap(npy + ".tmp", mode="w+", dtype=np.dtype(dtype), shape=shape)
        row = 0
        for chunk in chunks:
            chunk = np.asarray(chunk)
            if chunk.ndim != 2 or chunk.shape[1] != shape[1] or row + len(chunk) > shape[0]:
                raise ValueError(f"save_embedding_chunks: a chunk of shape {chunk.shape} at row {row} does "
                                 f"not fit [{shape[0]}, {shape[1]}]")
            out[row:row + len(chunk)] = chunk.astype(dtype, copy=False)
            row += len(chunk)
        if row != shape[0]:
            raise ValueError(f"save_embedding_chunks: {row} rows for {shape[0]} ids")
        out.flush()
        del out
    with open(ids_txt + ".tmp", "w") as fh:
        fh.write("\n".join(ids) + "\n")
    with open(info + ".tmp", "w") as fh:
        json.dump({"count": len(ids), "dim": shape[1], "dtype": dtype, **(meta or {})}, fh, indent=2)
    _replace_all([(npy + ".tmp", npy), (ids_txt + ".tmp", ids_txt), (info + ".tmp", info)])


def save_embeddings(out_dir: str, ids: list[str], emb: np.ndarray, meta: dict | None = None,
                    dtype: str = "float32") -> None:
    """`embeddings.npy` (`emb` stored as `dtype`: float32, or float16 for half the file), `ids.txt`,
    `embeddings.json`; each file moved into place whole (see save_embedding_chunks)."""
    emb = np.asarray(emb)
    dim = int(emb.shape[1]) if emb.ndim == 2 else 0
    save_embedding_chunks(out_dir, ids, dim, [emb] if emb.ndim == 2 else [], meta, dtype)


def load_embeddings(emb_dir: str) -> tuple[list[str], torch.Tensor]:
    """(ids, float32 [N, dim] tensor) of an embeddings folder; a float16 file is upcast to float32."""
    path = os.path.join(emb_dir, "embeddings.npy")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no embeddings (run `notellm2 embed --out {emb_dir}` first)")
    try:
        emb = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise EmbeddingsError(f"{path}: not a readable .npy array ({e})") from None
    if emb.ndim != 2:
        raise EmbeddingsError(f"{path}: expected a 2-D [notes, dim] array, got shape {tuple(emb.shape)}")
    if emb.dtype not in (np.float16, np.float32, np.float64):
        raise EmbeddingsError(f"{path}: dtype {emb.dtype}; embeddings are float32 or float16")
    ids_path = os.path.join(emb_dir, "ids.txt")
    if not os.path.exists(ids_path):
        raise FileNotFoundError(f"{ids_path}: no ids beside embeddings.npy")
    with open(ids_path) as fh:
        ids = [line.rstrip("\n") for line in fh if line.strip()]
    if len(ids) != len(emb):
        raise EmbeddingsError(f"{emb_dir}: {len(ids)} ids in ids.txt but {len(emb)} rows in embeddings.npy")
    return ids, torch.from_numpy(np.asarray(emb, dtype=np.float32))
