"""Ranking metrics under ties, and the one bootstrap of the evaluation (docs/evaluation.md).

Where a run puts a query's target is given by two counts: `greater`, the pool notes scoring strictly
above the target, and `equal`, the other pool notes scoring exactly the same. Under the `fair` rule
the target's 1-based rank is uniform over the e + 1 places g + 1 .. g + e + 1 (ties broken at random)
and every metric is its exact expectation over those places, not a sample:

    Recall@K  = clip((K - g) / (e + 1), 0, 1)
    MRR       = (H(g + e + 1) - H(g)) / (e + 1)                     H: harmonic numbers
    NDCG@K    = (D(min(g + e + 1, K)) - D(min(g, K))) / (e + 1)     D(n) = sum_{r <= n} 1 / log2(r + 1)

(one relevant note per query, so the ideal DCG is 1). Under `pessimistic` every tie counts against
the target: the rank is g + e + 1. A constant encoder (every pool note tied) scores chance under
`fair` and zero under `pessimistic`.

`bootstrap_ci` is the percentile interval over query notes; `paired` is the same bootstrap of the
per-query difference of two runs on the queries both scored (the same draws for both runs, so the
interval is that of the difference).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

TIES = ("fair", "pessimistic")


def _prefix(values_of_rank, n: int) -> np.ndarray:
    """[n + 1] table T with T[m] = sum over r = 1..m of values_of_rank(r) (T[0] = 0), in float64."""
    r = np.arange(1, n + 1, dtype=np.float64)
    return np.concatenate([[0.0], np.cumsum(values_of_rank(r))])


def tie_metrics(greater, equal, ks, ties: str = "fair", unknown: Optional[np.ndarray] = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(recall [n, len(ks)], ndcg [n, len(ks)], reciprocal rank [n]) per query, float64.

    unknown: rows whose target lies beyond what an approximate search returned (their counts are a
    lower bound); their reciprocal rank counts 0, so the mean is MRR truncated at that depth."""
    if ties not in TIES:
        raise ValueError(f"ties {ties!r}: allowed {', '.join(TIES)}")
    g = np.asarray(greater, dtype=np.int64)
    e = np.asarray(equal, dtype=np.int64)
    if ties == "pessimistic":
        g, e = g + e, np.zeros_like(e)
    if len(g) and (g.min() < 0 or e.min() < 0):
        raise ValueError("tie_metrics: negative counts")
    ks = np.asarray(list(ks), dtype=np.int64)
    places = (e + 1).astype(np.float64)
    last = g + e + 1  # the worst place
    recall = np.clip((ks[None, :] - g[:, None]) / places[:, None], 0.0, 1.0)
    top = int(last.max()) if len(last) else 0
    harmonic = _prefix(lambda r: 1.0 / r, top)
    rr = (harmonic[last] - harmonic[g]) / places
    dcg = _prefix(lambda r: 1.0 / np.log2(r + 1.0), int(min(top, ks.max())) if len(ks) else 0)
    ndcg = (dcg[np.minimum(last[:, None], ks[None, :])] - dcg[np.minimum(g[:, None], ks[None, :])]) / places[:, None]
    if unknown is not None:
        rr = np.where(np.asarray(unknown, dtype=bool), 0.0, rr)
    return recall, ndcg, rr


def bootstrap_ci(hits: np.ndarray, resamples: int = 1000, seed: int = 0, level: float = 0.95,
                 groups: Optional[np.ndarray] = None) -> np.ndarray:
    """[columns, 2] percentile interval of each column's mean (hits: [n, columns], any per-query
    values: 0/1 hits, expected recalls, differences of two runs) over query notes.

    groups: the query note of each row; resampling draws query notes, each with all its rows (the
    all-pairs protocol has several pairs per query note). Default: one query per row."""
    values = np.asarray(hits, dtype=np.float64)
    n = len(values)
    if n == 0:
        return np.full((values.shape[1], 2), np.nan)
    if groups is None:
        sums, sizes = values, np.ones(n)
    else:
        _, inv = np.unique(np.asarray(groups), return_inverse=True)
        sums = np.zeros((inv.max() + 1, values.shape[1]))
        np.add.at(sums, inv, values)
        sizes = np.bincount(inv).astype(np.float64)
    g = len(sizes)
    rng = np.random.default_rng(seed)
    rates = np.empty((resamples, values.shape[1]))
    step = max(1, 4_000_000 // max(1, g * values.shape[1]))
    for b in range(0, resamples, step):
        m = min(step, resamples - b)
        idx = rng.integers(0, g, size=(m, g))
        rates[b:b + m] = sums[idx].sum(1) / sizes[idx].sum(1)[:, None]
    a = (1 - level) / 2
    return np.quantile(rates, [a, 1 - a], axis=0).T


def paired(base: np.ndarray, run: np.ndarray, groups: Optional[np.ndarray], resamples: int, seed: int,
           level: float) -> tuple[np.ndarray, np.ndarray]:
    """(mean difference [columns], interval [columns, 2]) of run - base over the same rows (both
    [n, columns], row i the same query in both), by the bootstrap over query notes."""
    diff = np.asarray(run, dtype=np.float64) - np.asarray(base, dtype=np.float64)
    if len(diff) == 0:
        return np.full(diff.shape[1], np.nan), np.full((diff.shape[1], 2), np.nan)
    return diff.mean(0), bootstrap_ci(diff, resamples, seed, level, groups)
