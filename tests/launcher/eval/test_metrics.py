"""Ranking metrics under ties (notellm2.launcher.eval.metrics): the closed forms of the fair rule against a
brute-force average over every order of the tied notes, on hand-built vectors with known ties; the
pessimistic rule; the bootstrap and the paired bootstrap."""
import itertools
import math

import numpy as np
import pytest
import torch

from notellm2.launcher.eval import metrics, search


def brute_force(scores: np.ndarray, target: int, ks) -> tuple[list, list, float]:
    """Recall@K, NDCG@K and the reciprocal rank averaged over every order of the pool that sorts it by
    score (descending), ties in every possible order: the definition of random tie-breaking."""
    n = len(scores)
    recall, ndcg, rr, orders = np.zeros(len(ks)), np.zeros(len(ks)), 0.0, 0
    for perm in itertools.permutations(range(n)):
        ranked = sorted(perm, key=lambda j: -scores[j])  # stable: ties keep the permutation's order
        if any(scores[a] < scores[b] for a, b in zip(ranked, ranked[1:])):
            continue
        r = ranked.index(target) + 1
        orders += 1
        rr += 1 / r
        for i, k in enumerate(ks):
            recall[i] += r <= k
            ndcg[i] += (1 / math.log2(r + 1)) if r <= k else 0.0
    return list(recall / orders), list(ndcg / orders), rr / orders


def test_three_identical_pool_vectors_tied_with_the_target():
    """A query, its target and 3 pool notes identical to the target, 2 notes farther away: the target
    is one of 4 tied places at the top, so fair Recall@1 = 1/4 and the pessimistic rank is 4."""
    target = torch.tensor([[1.0, 0.0]])
    pool = torch.cat([target, target, target, target, torch.tensor([[0.0, 1.0], [-1.0, 0.0]])])
    query = torch.tensor([[0.8, 0.6]])
    g, e = search.target_counts(query, pool, torch.tensor([0]))
    assert (g.item(), e.item()) == (0, 3)
    recall, ndcg, rr = metrics.tie_metrics(g, e, [1, 2, 4, 5])
    assert recall[0].tolist() == [0.25, 0.5, 1.0, 1.0]
    assert rr[0] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    assert ndcg[0, 0] == pytest.approx(0.25)  # NDCG@1 = Recall@1 with one relevant note
    p_recall, p_ndcg, p_rr = metrics.tie_metrics(g, e, [1, 2, 4, 5], ties="pessimistic")
    assert p_recall[0].tolist() == [0.0, 0.0, 1.0, 1.0] and p_rr[0] == pytest.approx(1 / 4)
    assert p_ndcg[0].tolist() == pytest.approx([0.0, 0.0, 1 / math.log2(5), 1 / math.log2(5)])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_closed_forms_equal_the_average_over_every_tie_order(seed):
    """Small pools of vectors drawn from 3 distinct directions (so ties are everywhere): the fair
    counts' closed forms equal the brute-force average over all orders of the tied notes."""
    rng = np.random.default_rng(seed)
    dirs = torch.nn.functional.normalize(torch.tensor(rng.normal(size=(3, 4)), dtype=torch.float32), dim=1)
    pool = dirs[torch.tensor(rng.integers(0, 3, size=7))]
    queries = torch.nn.functional.normalize(torch.tensor(rng.normal(size=(5, 4)), dtype=torch.float32), dim=1)
    targets = torch.tensor(rng.integers(0, 7, size=5))
    ks = [1, 2, 3, 5, 7]
    g, e = search.target_counts(queries, pool, targets, pool_chunk=3, query_chunk=2)
    recall, ndcg, rr = metrics.tie_metrics(g, e, ks)
    # the reference scores one pair at a time (a dot product's result does not depend on where the
    # vector sits, unlike a matrix product's: see search.target_counts)
    scores = np.array([[float(torch.dot(q, p)) for p in pool] for q in queries])
    assert int(e.sum()) > 0  # the case has ties
    for i in range(5):
        want_r, want_n, want_rr = brute_force(scores[i], int(targets[i]), ks)
        assert recall[i].tolist() == pytest.approx(want_r)
        assert ndcg[i].tolist() == pytest.approx(want_n)
        assert rr[i] == pytest.approx(want_rr)


def test_a_constant_encoder_scores_chance_fair_and_zero_pessimistic():
    pool = torch.ones(50, 8)
    g, e = search.target_counts(pool[:10], pool, torch.arange(10, 20), exclude=torch.arange(10))
    assert g.tolist() == [0] * 10 and e.tolist() == [48] * 10  # 49 candidates: the target and 48 ties
    recall, ndcg, rr = metrics.tie_metrics(g, e, [1, 10, 49])
    assert recall.mean(0).tolist() == pytest.approx([1 / 49, 10 / 49, 1.0])  # K / candidates
    assert rr.mean() == pytest.approx(sum(1 / r for r in range(1, 50)) / 49)
    p_recall, _, _ = metrics.tie_metrics(g, e, [1, 10, 49], ties="pessimistic")
    assert p_recall.mean(0).tolist() == [0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="ties 'optimistic'"):
        metrics.tie_metrics(g, e, [1], ties="optimistic")


def test_no_ties_is_the_plain_rank():
    recall, ndcg, rr = metrics.tie_metrics([0, 3, 9], [0, 0, 0], [1, 4, 10])
    assert recall.tolist() == [[1, 1, 1], [0, 1, 1], [0, 0, 1]]
    assert rr.tolist() == pytest.approx([1, 1 / 4, 1 / 10])
    assert ndcg[1].tolist() == pytest.approx([0, 1 / math.log2(5), 1 / math.log2(5)])
    # an approximate backend's unknown rows: the reciprocal rank counts 0 (MRR truncated at its depth)
    _, _, rr = metrics.tie_metrics([0, 5], [0, 0], [1], unknown=np.array([False, True]))
    assert rr.tolist() == [1.0, 0.0]


def test_bootstrap_interval_is_seeded_and_has_the_binomial_width():
    hits = np.zeros((400, 2), dtype=bool)
    hits[:200, 0] = True
    hits[:, 1] = True
    ci = metrics.bootstrap_ci(hits, resamples=1000, seed=3)
    assert np.array_equal(ci, metrics.bootstrap_ci(hits, resamples=1000, seed=3))
    assert not np.array_equal(ci, metrics.bootstrap_ci(hits, resamples=1000, seed=4))
    half = 1.96 * math.sqrt(0.25 / 400)  # normal approximation: 0.049
    assert ci[0, 0] == pytest.approx(0.5 - half, abs=0.012) and ci[0, 1] == pytest.approx(0.5 + half, abs=0.012)
    assert ci[1].tolist() == [1.0, 1.0]


def test_bootstrap_draws_query_notes_with_all_their_pairs():
    # one query note with 9 pairs, all hits; 9 notes with one miss each: 18 pairs, recall 0.5
    hits = np.array([[True]] * 9 + [[False]] * 9)
    notes = ["a"] * 9 + [f"m{i}" for i in range(9)]
    by_pair = metrics.bootstrap_ci(hits, 1000, seed=0)
    by_note = metrics.bootstrap_ci(hits, 1000, seed=0, groups=np.array(notes, dtype=object))
    assert by_note[0, 1] - by_note[0, 0] > 1.5 * (by_pair[0, 1] - by_pair[0, 0])  # the note is the unit
    distinct = metrics.bootstrap_ci(hits, 1000, seed=0, groups=np.array([f"q{i:02d}" for i in range(18)], dtype=object))
    assert np.array_equal(distinct, by_pair)  # one pair per note: the same draws as by pair


def test_the_paired_interval_is_narrower_than_the_runs_own():
    """Two runs that differ on 20 of 400 queries (run better on all 20) but vary together on the rest:
    the paired interval of the difference excludes 0, while the two runs' own intervals overlap."""
    rng = np.random.default_rng(0)
    base = (rng.random((400, 1)) < 0.5).astype(float)
    run = base.copy()
    flip = np.flatnonzero(base[:, 0] == 0)[:20]
    run[flip, 0] = 1.0
    diff, ci = metrics.paired(base, run, None, 1000, 0, 0.95)
    assert diff[0] == pytest.approx(20 / 400) and ci[0, 0] > 0
    own_base, own_run = metrics.bootstrap_ci(base, 1000, 0), metrics.bootstrap_ci(run, 1000, 0)
    assert own_run[0, 0] < own_base[0, 1]  # unpaired, the intervals overlap
