"""Top-k lists in one total order, with scores that do not depend on how they were computed.

A related-notes table that is updated day by day must equal the one a full rebuild would give, so
both the order and the scores must be well defined:

- **Order**: score descending, then note id ascending (`order`: each pool row's rank among the
  pool's note ids).
- **Canonical scores**: the vectors are L2-normalised and rounded to the grid of 2^-24
  (`to_grid`; the rounding moves a unit vector's scores by under 1e-6). The inner product of two
  grid vectors is a multiple of 2^-48 below 2^48 units in every partial sum, so float64 computes it
  exactly, in any summation order; `canonical_scores` rounds that once to float32. The score of a
  pair is thus a function of the two vectors alone, not of block shapes, BLAS kernels, thread counts
  or which side is the query. (A plain float32 torch.mm gave the same pair scores differing by up to
  2.4e-7 between matrix shapes on this machine, enough to swap near-ties.)

The search itself runs in float32 (`notellm2.launcher.eval.search.exact_topk`, the fast chunked
kernel): a float32 product of two grid vectors differs from the canonical score by at most
`score_slack(d)` = (d + 2) 2^-23 (the float32 summation bound for unit vectors, doubled). Each
query fetches its top K + (its duplicate group) + `MARGIN` by float32 score, rescores them
canonically and sorts them in the total order. The list is final when its K-th entry scores above
the last fetched float32 score plus the slack: no row left out could reach it. Otherwise (near-ties
across the boundary, or a group of equal vectors larger than what was fetched) that query is
re-searched by a canonical scan of the whole pool (`_canonical_scan`), which is exact by
construction. The test that exact updates equal rebuilds relies on this.

Duplicate groups: rows with the same content hash share a group id. With `drop_same_group`, a
query's own group (its exact re-posts) is not eligible for its list.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

GRID_BITS = 24
MARGIN = 8  # extra rows fetched per query beyond K and its duplicate group
SCAN_BLOCK = 65536  # pool rows per block of a canonical scan


def to_grid(vectors) -> np.ndarray:
    """L2-normalised float32 rows rounded to the grid of 2^-GRID_BITS (exact in float32)."""
    x = torch.nn.functional.normalize(torch.as_tensor(np.asarray(vectors, np.float32)), dim=1)
    scale = float(2 ** GRID_BITS)
    return torch.round(x * scale).div_(scale).numpy()


def score_slack(dim: int) -> float:
    """An upper bound on |float32 product - canonical score| for two grid vectors of `dim` entries."""
    return (dim + 2) * 2.0 ** -23


def canonical_scores(q: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Row-wise canonical scores of grid vectors: q [n, d] against p [n, m, d] (or [n, d]) -> float32."""
    q64 = np.asarray(q, np.float64)
    p64 = np.asarray(p, np.float64)
    if p64.ndim == 2:
        return np.einsum("nd,nd->n", q64, p64).astype(np.float32)
    return np.einsum("nd,nmd->nm", q64, p64).astype(np.float32)


@dataclass
class PoolKeys:
    """What the order and the eligibility of pool rows need."""
    order: np.ndarray  # int64 [N]: rank of each row's note id among the pool's ids
    group: np.ndarray  # int64 [N]: duplicate group (equal content hashes)
    group_size: np.ndarray  # int64 [N]: size of each row's group in the pool


def pool_keys(ids, hashes: np.ndarray) -> PoolKeys:
    from notellm2.data_shards.reader.content_hash import hash_keys

    ids = np.asarray(ids, dtype=str) if not isinstance(ids, np.ndarray) else ids
    order = np.empty(len(ids), np.int64)
    order[np.argsort(ids, kind="stable")] = np.arange(len(ids))
    _, group = np.unique(hash_keys(hashes), return_inverse=True)
    group = group.astype(np.int64).reshape(-1)
    return PoolKeys(order, group, np.bincount(group, minlength=group.max() + 1 if len(group) else 0)[group])


def _sort_lists(rows: np.ndarray, scores: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row of (rows, scores) [n, m] by score descending, then order ascending; -1 rows last."""
    n, m = rows.shape
    valid = rows >= 0
    key_order = np.where(valid, order[np.where(valid, rows, 0)], np.iinfo(np.int64).max)
    key_score = np.where(valid, -scores.astype(np.float64), np.inf)
    line = np.repeat(np.arange(n), m)
    idx = np.lexsort((key_order.reshape(-1), key_score.reshape(-1), line)).reshape(n, m) - (np.arange(n) * m)[:, None]
    return np.take_along_axis(rows, idx, 1), np.take_along_axis(scores, idx, 1)


def _eligible(rows: np.ndarray, q_self: np.ndarray, q_group: np.ndarray, keys: PoolKeys,
              drop_same_group: bool) -> np.ndarray:
    ok = (rows >= 0) & (rows != q_self[:, None])
    if drop_same_group:
        ok &= keys.group[np.where(rows >= 0, rows, 0)] != q_group[:, None]
    return ok


def _available(q_self: np.ndarray, q_group: np.ndarray, keys: PoolKeys, n_pool: int, drop: bool) -> np.ndarray:
    """How many pool rows each query may list."""
    avail = np.full(len(q_self), n_pool, np.int64) - (q_self >= 0)
    if drop:
        sizes = np.bincount(keys.group, minlength=int(max(keys.group.max(initial=-1), q_group.max(initial=-1))) + 1)
        avail -= sizes[q_group] - (q_self >= 0)
    return avail


def finish_lists(queries: np.ndarray, q_self: np.ndarray, q_group: np.ndarray, cand: np.ndarray,
                 pool: np.ndarray, keys: PoolKeys, K: int, drop_same_group: bool
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Canonical scores of the candidate rows `cand` [n, m] (-1 for none), the ineligible ones removed,
    each list sorted in the total order and cut to K: (rows [n, K], scores [n, K]), -1 / -inf padded."""
    n, m = cand.shape
    ok = _eligible(cand, q_self, q_group, keys, drop_same_group)
    safe = np.where(ok, cand, 0)
    scores = np.where(ok, canonical_scores(queries, pool[safe.reshape(-1)].reshape(n, m, -1)), -np.inf)
    rows, scores = _sort_lists(np.where(ok, cand, -1), scores.astype(np.float32), keys.order)
    if m < K:
        rows = np.concatenate([rows, np.full((n, K - m), -1, np.int64)], 1)
        scores = np.concatenate([scores, np.full((n, K - m), -np.inf, np.float32)], 1)
    return rows[:, :K], scores[:, :K]


def _canonical_scan(queries: np.ndarray, q_self: np.ndarray, q_group: np.ndarray, pool: np.ndarray,
                    keys: PoolKeys, K: int, drop: bool) -> tuple[np.ndarray, np.ndarray]:
    """The exact lists by a canonical scan of the whole pool, block by block, keeping the running best
    K (plus every row tied with the K-th) in the total order."""
    n = len(queries)
    best_rows = np.full((n, 0), -1, np.int64)
    best_scores = np.full((n, 0), -np.inf, np.float32)
    q64 = np.asarray(queries, np.float64)
    for p0 in range(0, len(pool), SCAN_BLOCK):
        block = np.asarray(pool[p0:p0 + SCAN_BLOCK], np.float64)
        s = (q64 @ block.T).astype(np.float32)  # exact in float64 (grid vectors), then rounded once
        rows = np.broadcast_to(np.arange(p0, p0 + len(block)), s.shape)
        ok = _eligible(rows, q_self, q_group, keys, drop)
        s = np.where(ok, s, -np.inf)
        take = min(K, s.shape[1])
        kth = -np.partition(-s, take - 1, axis=1)[:, take - 1:take] if take else np.full((n, 1), np.inf)
        width = int((s >= kth).sum(1).max()) if take else 0  # ties with the K-th come along
        pick = np.argpartition(-s, width - 1, axis=1)[:, :width] if width < s.shape[1] else \
            np.broadcast_to(np.arange(s.shape[1]), s.shape)
        cand_rows = np.where(np.take_along_axis(ok, pick, 1), pick + p0, -1)
        cand_scores = np.take_along_axis(s, pick, 1)
        rows_all = np.concatenate([best_rows, cand_rows], 1)
        scores_all = np.concatenate([best_scores, cand_scores], 1)
        best_rows, best_scores = _sort_lists(rows_all, scores_all, keys.order)
        best_rows, best_scores = best_rows[:, :K], best_scores[:, :K]
    if best_rows.shape[1] < K:
        pad = K - best_rows.shape[1]
        best_rows = np.concatenate([best_rows, np.full((n, pad), -1, np.int64)], 1)
        best_scores = np.concatenate([best_scores, np.full((n, pad), -np.inf, np.float32)], 1)
    return best_rows, best_scores


def ranked_topk(queries: np.ndarray, q_self: np.ndarray, q_group: np.ndarray, pool: np.ndarray, keys: PoolKeys,
                K: int, drop_same_group: bool = False, pool_tensor: Optional[torch.Tensor] = None,
                stats: Optional[dict] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact lists of grid-vector `queries` against the grid-vector `pool`: (rows [n, K] int64, canonical
    scores [n, K] float32, complete [n] bool: the list holds every eligible row). `q_self`: each query's
    own pool row (never listed) or -1; `q_group`: its duplicate group (see the module docstring)."""
    from notellm2.launcher.eval.search import exact_topk

    n = len(queries)
    q_self = np.asarray(q_self, np.int64)
    q_group = np.asarray(q_group, np.int64)
    out_rows = np.full((n, K), -1, np.int64)
    out_scores = np.full((n, K), -np.inf, np.float32)
    avail = _available(q_self, q_group, keys, len(pool), drop_same_group)
    complete = avail <= K
    if n == 0 or len(pool) == 0:
        return out_rows, out_scores, complete
    pt = pool_tensor if pool_tensor is not None else torch.from_numpy(np.ascontiguousarray(pool))
    slack = score_slack(pool.shape[1])
    own = keys.group_size[np.where(q_self >= 0, q_self, 0)] if len(keys.group_size) else np.zeros(n, np.int64)
    extra = np.where(q_self >= 0, own, 0)
    # fetch sizes rounded up to a power of two, so that queries share a few exact_topk calls
    want = K + extra + MARGIN
    fetch_of = np.minimum(2 ** np.ceil(np.log2(np.maximum(want, 1))).astype(np.int64),
                          len(pool) - (q_self >= 0))
    fallback = []
    for fetch in np.unique(fetch_of):
        sel = np.flatnonzero(fetch_of == fetch)
        has_self = q_self[sel] >= 0
        for part, ex in ((sel[has_self], True), (sel[~has_self], False)):
            if not len(part):
                continue
            f = int(min(fetch, len(pool) - (1 if ex else 0)))
            if f <= 0:
                continue
            s32, cand = exact_topk(torch.from_numpy(np.ascontiguousarray(queries[part])), pt, f,
                                   exclude=torch.from_numpy(q_self[part]) if ex else None)
            cand, s32 = cand.numpy(), s32.numpy()
            rows, scores = finish_lists(queries[part], q_self[part], q_group[part], cand, pool, keys, K,
                                        drop_same_group)
            out_rows[part], out_scores[part] = rows, scores
            whole = f >= len(pool) - (1 if ex else 0)  # the query saw every row
            kth = scores[:, K - 1]
            final = whole | (kth > s32[:, -1] + slack)
            fallback.extend(part[~final].tolist())
    if fallback:
        fb = np.asarray(sorted(fallback), np.int64)
        out_rows[fb], out_scores[fb] = _canonical_scan(queries[fb], q_self[fb], q_group[fb], pool, keys, K,
                                                       drop_same_group)
    if stats is not None:
        stats["canonical_scans"] = stats.get("canonical_scans", 0) + len(fallback)
    return out_rows, out_scores, complete


def reverse_insertions(rows: np.ndarray, pool: np.ndarray, keys: PoolKeys, tau_score: np.ndarray,
                       tau_order: np.ndarray, complete: np.ndarray, new_rows: np.ndarray, drop_same_group: bool,
                       tile: int = 8192, block: int = 512) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For the existing pool rows `rows`, each with its list's last entry (tau_score, tau_order) (or
    `complete`: every eligible row is listed), the new rows `new_rows` that enter its list: those
    strictly before the last entry in the total order. Returns (row, new row, canonical score) triples,
    in the order of `rows`. Float32 products find the candidates (within the slack of the last entry),
    canonical scores decide. Blocks of `block` rows run on worker threads, each single-threaded in
    torch (two intra-op threads doubled the CPU seconds of these thin products here)."""
    from notellm2.launcher.eval.search import _map_chunks

    slack = score_slack(pool.shape[1])
    thr = np.where(complete, -np.inf, tau_score - slack).astype(np.float32)
    news = [(new_rows[a0:a0 + tile], torch.from_numpy(np.ascontiguousarray(pool[new_rows[a0:a0 + tile]].T)))
            for a0 in range(0, len(new_rows), tile)]
    found: dict = {}

    def one(b0: int, b1: int) -> None:
        x = torch.from_numpy(np.ascontiguousarray(pool[rows[b0:b1]]))
        t = torch.from_numpy(thr[b0:b1, None])
        got = []
        for a, a_t in news:
            i, j = (v.numpy() + off for v, off in zip(torch.nonzero(torch.mm(x, a_t) >= t, as_tuple=True), (b0, 0)))
            if not len(i):
                continue
            r, c = rows[i], a[j]
            s = canonical_scores(pool[r], pool[c])
            before = complete[i] | (s > tau_score[i]) | ((s == tau_score[i]) & (keys.order[c] < tau_order[i]))
            if drop_same_group:
                before &= keys.group[r] != keys.group[c]
            got.append((r[before], c[before], s[before]))
        found[b0] = got

    _map_chunks(one, len(rows), block, None, None)
    parts = [g for b0 in sorted(found) for g in found[b0]]
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return tuple(np.concatenate([p[k] for p in parts]) for k in range(3))
