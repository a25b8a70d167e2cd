"""Nearest-neighbour search over note embeddings: exact (chunked matrix products) and faiss.

Two exact primitives share one blocking scheme: the queries are cut into chunks of
`query_chunk` rows and the pool into chunks of `pool_chunk` rows, so the score block in memory is
never larger than query_chunk x pool_chunk floats, whatever the pool size.

- `exact_topk`: the k best pool rows of every query by inner product. Inside a block the scores
  are cut into groups of `GROUP` columns and each group's maximum taken (a fast reduction); the k
  best elements of a block lie inside its k groups with the highest maxima (each of them is at
  most its own group's maximum, and at most k groups can hold a maximum at or above the k-th best
  value), so only k x GROUP candidates per row go through `torch.topk`, and they are merged into
  the running top k. Measured here: the full-block `torch.topk` costs 2-4x the matrix product at
  d = 64; the group maxima cost under a tenth of it (benchmarks/bench_search.py has the figures).
- `target_counts`: for the evaluation, where a known target stands among the pool: `greater`, the
  pool rows scoring strictly above it, and `equal`, the other rows scoring exactly the same (float32
  equality), not counting the target itself or an excluded row (the query, when it is in the pool).
  The target's score is read from the same score block as the rows it is compared with (the queries
  are grouped by the pool block that holds their target, and that block is scored first), so an
  identical vector always ties with the target. `score_counts` does the same for any block scorer
  (the reference rows of launcher/eval/reference.py: BM25, the category oracle); `target_ranks` is
  greater + equal, the rank with every tie counted against the target.

faiss (optional, `faiss-cpu`): `faiss_topk` builds an IVF or HNSW index with inner-product metric;
`overlap_recall` measures how much of the exact top k it finds, which callers print whenever an
approximate backend is used.
"""
from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import numpy as np
import torch


GROUP = 32  # columns per group maximum; 16 was slower (the reduction vectorises over 32 floats)
QUERY_CHUNK = 64
POOL_CHUNK = 65536
BACKENDS = ("exact", "faiss-ivf", "faiss-hnsw")

Progress = Optional[Callable[[int], None]]  # called with the number of queries just finished


def _as_float(x) -> torch.Tensor:
    x = torch.as_tensor(x)
    return x.float().contiguous() if x.dtype != torch.float32 else x.contiguous()


def _blocks(n: int, size: int):
    for s in range(0, n, size):
        yield s, min(n, s + size)


def _mask_excluded(scores: torch.Tensor, exclude: Optional[torch.Tensor], p0: int, p1: int) -> None:
    """Set scores[i, exclude[i] - p0] to -inf where exclude[i] falls in pool rows [p0, p1)."""
    if exclude is None:
        return
    inside = (exclude >= p0) & (exclude < p1)
    if bool(inside.any()):
        rows = inside.nonzero().squeeze(1)
        scores[rows, exclude[rows] - p0] = float("-inf")


def _block_topk(scores: torch.Tensor, k: int, floor: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to k best of each row of a block (values, column indices), through group maxima when it
    pays. floor ([m, 1], optional): each row's current k-th best; only groups whose maximum beats
    it can add anything, so once the running top k is good only a few groups per row are read
    (possibly none: then nothing comes back)."""
    m, n = scores.shape
    if n <= k * GROUP * 2 or n % GROUP:
        return torch.topk(scores, min(k, n), dim=1, sorted=False)
    groups = scores.view(m, n // GROUP, GROUP).amax(2)
    g = k
    if floor is not None:
        g = min(k, int((groups > floor).sum(1).max()))
        if g == 0:
            return scores.new_empty((m, 0)), torch.empty((m, 0), dtype=torch.long)
    top_groups = torch.topk(groups, g, dim=1, sorted=False).indices  # [m, g]
    cols = (top_groups.unsqueeze(2) * GROUP + torch.arange(GROUP)).reshape(m, g * GROUP)
    cand = scores.gather(1, cols)
    val, pos = torch.topk(cand, min(k, g * GROUP), dim=1, sorted=False)
    return val, cols.gather(1, pos)


@contextlib.contextmanager
def _one_thread_per_worker(workers: int):
    """Run torch ops single-threaded while `workers` Python threads each take a query chunk.

    Measured here (2 cores, shared): with 2 intra-op threads the small per-block reductions cost
    0.5-0.7x the matrix product (fork/join per op); single-threaded 0.1x. So the parallelism goes
    over query chunks (ATen releases the GIL) and every op inside runs on one thread."""
    before = torch.get_num_threads()
    if workers > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if workers > 1:
            torch.set_num_threads(before)


def _map_chunks(fn, n_q: int, query_chunk: int, workers: Optional[int], progress: Progress) -> None:
    """fn(q0, q1) over the query chunks, on `workers` threads (default: torch's thread count)."""
    _map_ranges(fn, list(_blocks(n_q, query_chunk)), workers, progress)


def _map_ranges(fn, chunks: list, workers: Optional[int], progress: Progress) -> None:
    """fn(c0, c1) over the given ranges, on `workers` threads (see _one_thread_per_worker)."""
    workers = max(1, min(len(chunks), workers or torch.get_num_threads()))
    with _one_thread_per_worker(workers):
        if workers == 1:
            for q0, q1 in chunks:
                fn(q0, q1)
                if progress is not None:
                    progress(q1 - q0)
            return
        with ThreadPoolExecutor(workers) as pool:
            for (q0, q1), _ in zip(chunks, pool.map(lambda c: fn(*c), chunks)):
                if progress is not None:
                    progress(q1 - q0)


def exact_topk(queries, pool, k: int, exclude=None, query_chunk: int = QUERY_CHUNK,
               pool_chunk: int = POOL_CHUNK, progress: Progress = None, workers: Optional[int] = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top k by inner product: (scores [Q, k] descending, pool indices [Q, k]).

    exclude: optional [Q] pool index per query that may not be returned (the query itself in a
    related-notes table; -1 for none). k larger than the pool (minus the excluded row) is an error.
    Memory: one query_chunk x pool_chunk score block per worker thread, plus the output.
    """
    queries, pool = _as_float(queries), _as_float(pool)
    n_q, n_p = len(queries), len(pool)
    available = n_p - (1 if exclude is not None else 0)
    if k < 1 or k > available:
        raise ValueError(f"exact_topk: k={k} but the pool has {available} candidates per query")
    ex = None if exclude is None else torch.as_tensor(exclude, dtype=torch.long)
    out_v = torch.empty(n_q, k)
    out_i = torch.empty(n_q, k, dtype=torch.long)
    blocks = threading.local()

    def one_chunk(q0: int, q1: int) -> None:
        if not hasattr(blocks, "s"):
            blocks.s = torch.empty(query_chunk, min(pool_chunk, n_p))
        q = queries[q0:q1]
        best_v = torch.full((q1 - q0, 0), float("-inf"))
        best_i = torch.empty((q1 - q0, 0), dtype=torch.long)
        for p0, p1 in _blocks(n_p, pool_chunk):
            s = blocks.s[:q1 - q0, :p1 - p0]
            torch.mm(q, pool[p0:p1].T, out=s)
            _mask_excluded(s, None if ex is None else ex[q0:q1], p0, p1)
            floor = best_v.amin(1, keepdim=True) if best_v.shape[1] == k else None  # k-th best so far
            v, i = _block_topk(s, min(k, p1 - p0), floor)
            if v.shape[1] == 0:
                continue
            v, i = torch.cat([best_v, v], 1), torch.cat([best_i, i + p0], 1)
            if v.shape[1] > k:
                v, pos = torch.topk(v, k, dim=1, sorted=False)
                i = i.gather(1, pos)
            best_v, best_i = v, i
        order = torch.argsort(best_v, dim=1, descending=True, stable=True)
        out_v[q0:q1] = best_v.gather(1, order)
        out_i[q0:q1] = best_i.gather(1, order)

    _map_chunks(one_chunk, n_q, query_chunk, workers, progress)
    return out_v, out_i


ScoreBlock = Callable[[torch.Tensor, int, int, torch.Tensor], torch.Tensor]


def score_counts(score_block: ScoreBlock, n_q: int, n_p: int, target_idx, exclude=None, weights=None,
                 query_chunk: int = QUERY_CHUNK, pool_chunk: int = POOL_CHUNK, progress: Progress = None,
                 workers: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(greater, equal) [Q] int64: for query i, the pool notes scoring strictly above its target
    (pool column target_idx[i]) and the other pool notes scoring exactly the same; the target itself
    and the note exclude[i] (a pool column, if given) are not counted.

    score_block(rows, p0, p1, out) returns the float32 scores [len(rows), p1 - p0] of the queries
    `rows` (a LongTensor of query indices) against pool columns [p0, p1); it may fill and return
    `out` (a free buffer of that shape). weights: [n_p] notes per column (a column may stand for
    several identical notes; default 1 each). The queries are grouped by the pool block holding
    their target and each group scores that block first, so the target's score is the number read
    from the same call as the scores it is compared with."""
    tgt = torch.as_tensor(target_idx, dtype=torch.long)
    ex = None if exclude is None else torch.as_tensor(exclude, dtype=torch.long)
    if len(tgt) != n_q or (ex is not None and len(ex) != n_q):
        raise ValueError(f"score_counts: {n_q} queries but {len(tgt)} targets"
                         + ("" if ex is None else f" and {len(ex)} excluded rows"))
    if n_q and (int(tgt.min()) < 0 or int(tgt.max()) >= n_p):
        raise ValueError(f"score_counts: a target index outside the pool of {n_p} rows")
    if weights is None and ex is not None and bool((ex == tgt).any()):
        raise ValueError("score_counts: a query's excluded row is its own target")
    w = None if weights is None or bool((torch.as_tensor(weights) == 1).all()) else \
        torch.as_tensor(weights, dtype=torch.float64)  # float64: exact counts up to 2**53
    greater = torch.zeros(n_q, dtype=torch.long)
    equal = torch.zeros(n_q, dtype=torch.long)
    if n_q == 0:
        return greater, equal
    block_of = tgt // pool_chunk
    order = torch.argsort(block_of, stable=True)
    sorted_blocks = block_of[order]
    starts = [0] + (torch.nonzero(sorted_blocks[1:] != sorted_blocks[:-1]).squeeze(1) + 1).tolist() + [n_q]
    chunks = [(c0, min(b1, c0 + query_chunk)) for b0, b1 in zip(starts[:-1], starts[1:])
              for c0 in range(b0, b1, query_chunk)]
    n_blocks = (n_p + pool_chunk - 1) // pool_chunk
    buffers = threading.local()

    def one_chunk(c0: int, c1: int) -> None:
        if not hasattr(buffers, "s"):
            buffers.s = torch.empty(query_chunk, min(pool_chunk, n_p))
            buffers.cmp = torch.empty(query_chunk, min(pool_chunk, n_p), dtype=torch.bool)
        rows, m = order[c0:c1], c1 - c0
        t = tgt[rows]
        x = None if ex is None else ex[rows]
        first = int(sorted_blocks[c0])
        t_score = None
        above = torch.zeros(m, dtype=torch.long)
        at_or_above = torch.zeros(m, dtype=torch.long)
        for b in [first] + [b for b in range(n_blocks) if b != first]:
            p0, p1 = b * pool_chunk, min(n_p, (b + 1) * pool_chunk)
            s = score_block(rows, p0, p1, buffers.s[:m, :p1 - p0])
            if t_score is None:  # the targets' own block, scored first
                t_score = s[torch.arange(m), t - p0].clone().unsqueeze(1)
            cmp = buffers.cmp[:m, :p1 - p0]
            for op, acc in ((torch.gt, above), (torch.ge, at_or_above)):
                op(s, t_score, out=cmp)
                acc += cmp.sum(1, dtype=torch.int32) if w is None else (cmp.double() @ w[p0:p1]).round().long()
            if x is not None:  # the excluded note: take back what it added
                inside = ((x >= p0) & (x < p1)).nonzero().squeeze(1)
                xs = s[inside, x[inside] - p0].unsqueeze(1)
                above[inside] -= (xs > t_score[inside]).squeeze(1).long()
                at_or_above[inside] -= (xs >= t_score[inside]).squeeze(1).long()
        greater[rows] = above
        equal[rows] = at_or_above - above - 1  # the target itself scores its own score

    _map_ranges(one_chunk, chunks, workers, progress)
    return greater, equal


def target_counts(queries, pool, target_idx, exclude=None, query_chunk: int = QUERY_CHUNK,
                  pool_chunk: int = POOL_CHUNK, progress: Progress = None, workers: Optional[int] = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(greater, equal) of each query's target by inner product (see score_counts); `exclude`: an
    optional [Q] pool row per query left out of the count (the query itself when it is in the pool).

    Identical pool vectors are scored once (one column standing for all of them): a matrix product's
    float32 result depends on where a column falls in the kernel's tiling (seen here: two identical
    columns of one product differing in the last bit), so scoring each copy would split exact ties."""
    queries, pool = _as_float(queries), _as_float(pool)
    unique, inverse, counts = torch.unique(pool, dim=0, return_inverse=True, return_counts=True)
    tgt = inverse[torch.as_tensor(target_idx, dtype=torch.long)]
    ex = None if exclude is None else inverse[torch.as_tensor(exclude, dtype=torch.long)]

    def block(rows, p0, p1, out):
        return torch.mm(queries.index_select(0, rows), unique[p0:p1].T, out=out)

    return score_counts(block, len(queries), len(unique), tgt, ex, counts, query_chunk, pool_chunk, progress, workers)


def target_ranks(queries, pool, target_idx, exclude=None, query_chunk: int = QUERY_CHUNK,
                 pool_chunk: int = POOL_CHUNK, progress: Progress = None, workers: Optional[int] = None
                 ) -> torch.Tensor:
    """0-based rank of pool row target_idx[i] for query i with every tie counted against the target
    (greater + equal of target_counts). Returns [Q] int64."""
    greater, equal = target_counts(queries, pool, target_idx, exclude, query_chunk, pool_chunk, progress, workers)
    return greater + equal


def _faiss():
    from notellm2.errors import require

    return require("faiss", "faiss")


def faiss_index(pool, backend: str, nlist: Optional[int] = None, nprobe: int = 16, hnsw_m: int = 32,
                ef_search: int = 128, seed: int = 0):
    """An inner-product faiss index over `pool` ([P, d] float32): IVF-Flat or HNSW-Flat."""
    faiss = _faiss()
    x = np.ascontiguousarray(np.asarray(pool, dtype=np.float32))
    n, d = x.shape
    if backend == "faiss-ivf":
        nlist = nlist or max(1, min(n // 39, int(4 * np.sqrt(n))))  # faiss wants >= 39 points per list
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        train = x if n <= 64 * nlist else x[rng.choice(n, 64 * nlist, replace=False)]
        index.train(train)
        index.add(x)
        index.nprobe = min(nprobe, nlist)
    elif backend == "faiss-hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = ef_search
        index.add(x)
    else:
        raise ValueError(f"unknown faiss backend {backend!r}; choose one of {', '.join(BACKENDS[1:])}")
    return index


def faiss_topk(queries, pool, k: int, backend: str, exclude=None, index=None, query_chunk: int = 4096,
               progress: Progress = None, **index_args) -> tuple[torch.Tensor, torch.Tensor]:
    """Approximate top k (scores, pool indices) through faiss; `exclude` as in `exact_topk`.
    Slots faiss leaves empty (index -1) come back with index -1 and score -inf."""
    index = index if index is not None else faiss_index(pool, backend, **index_args)
    if backend == "faiss-hnsw":
        index.hnsw.efSearch = max(index.hnsw.efSearch, k + 1)
    q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
    extra = 1 if exclude is not None else 0
    ex = None if exclude is None else np.asarray(exclude, dtype=np.int64)
    out_v = np.full((len(q), k), -np.inf, dtype=np.float32)
    out_i = np.full((len(q), k), -1, dtype=np.int64)
    for q0, q1 in _blocks(len(q), query_chunk):
        d, i = index.search(q[q0:q1], k + extra)
        if ex is not None:
            drop = i == ex[q0:q1, None]
            drop[:, -1] |= ~drop.any(1)  # nothing excluded: drop the last of the k + 1
            keep = ~drop
            d = d[keep].reshape(q1 - q0, k)
            i = i[keep].reshape(q1 - q0, k)
        out_v[q0:q1], out_i[q0:q1] = d, i
        if progress is not None:
            progress(q1 - q0)
    out_v[out_i < 0] = -np.inf
    return torch.from_numpy(out_v), torch.from_numpy(out_i)


def search_topk(queries, pool, k: int, backend: str = "exact", exclude=None, progress: Progress = None,
                **kw) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "exact":
        return exact_topk(queries, pool, k, exclude=exclude, progress=progress, **kw)
    if backend in BACKENDS:
        return faiss_topk(queries, pool, k, backend, exclude=exclude, progress=progress, **kw)
    raise ValueError(f"unknown search backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def overlap_recall(approx_idx: torch.Tensor, exact_idx: torch.Tensor) -> float:
    """Mean fraction of each row's exact top k that the approximate top k also holds."""
    a, e = np.asarray(approx_idx), np.asarray(exact_idx)
    hits = sum(len(np.intersect1d(x, y, assume_unique=False)) for x, y in zip(a, e))
    return hits / e.size if e.size else 1.0
