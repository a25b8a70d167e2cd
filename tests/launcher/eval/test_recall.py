"""Recall@K: the paper protocol's pair selection and pool, ranks on hand-built embeddings, capped K,
subsets and bootstrap intervals (notellm2.launcher.eval.evaluate)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from notellm2.launcher.eval.evaluate import (all_pairs_task, bootstrap_ci, evaluate_runs, length_subsets, paper_task,
                               popularity_subsets, rank_run, recall_at_k, save_embeddings, split_popularity_subsets,
                               target_ranks, train_pair_counts)


def brute_force_rank(pool, q, t):
    scores = pool @ pool[q]
    return sum(1 for j in range(len(pool)) if j not in (q, t) and scores[j] >= scores[t])


def unit(deg):
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_ranks_match_brute_force_and_exclude_the_query():
    g = torch.Generator().manual_seed(0)
    pool = F.normalize(torch.randn(50, 8, generator=g), dim=1)
    q = torch.randint(0, 50, (40,), generator=g)
    t = (q + torch.randint(1, 50, (40,), generator=g)) % 50
    got = target_ranks(pool, q, t, chunk=7)
    want = [brute_force_rank(pool, int(a), int(b)) for a, b in zip(q, t)]
    assert got.tolist() == want


def test_recall_on_a_hand_built_pool():
    # a and b are near each other; c is far; d is between.
    pool = F.normalize(torch.tensor([[1.0, 0.0], [0.99, 0.1], [-1.0, 0.0], [0.5, 0.5]]), dim=1)
    ids = ["a", "b", "c", "d"]
    rep = recall_at_k(pool, ids, [("a", "b"), ("a", "c"), ("c", "d"), ("a", "zzz")], [1, 2, 3])
    # a->b rank 0; a->c: b and d ahead -> rank 2; c->d: from c, d (-0.707) beats b (-0.99) -> rank 0
    assert rep.recall == {1: 2 / 3, 2: 2 / 3, 3: 1.0}
    assert rep.num_pairs == 3 and rep.num_skipped == 1 and rep.pool_size == 4


def test_constant_embeddings_score_no_better_than_last():
    pool = F.normalize(torch.ones(10, 4), dim=1)
    rep = recall_at_k(pool, [str(i) for i in range(10)], [("0", "1"), ("2", "3")], [1, 8, 9])
    assert rep.recall[1] == 0.0 and rep.recall[8] == 0.0 and rep.recall[9] == 1.0


# the paper protocol --------------------------------------------------------------------------
TEST_NOTES = ["q1", "t1", "q2", "t2", "x"]
PAIRS = [("q1", "t1"),   # kept
         ("q1", "t2"),   # q1 already a query
         ("t1", "q2"),   # t1 already a target
         ("q2", "tr"),   # tr is not a test note
         ("q2", "t2"),   # kept
         ("x", "q1"),    # q1 used
         ("x", "x")]     # a self pair


def test_paper_task_keeps_each_note_in_one_pair_in_file_order():
    task = paper_task(PAIRS, TEST_NOTES)
    assert list(zip(task.query_ids, task.target_ids)) == [("q1", "t1"), ("q2", "t2")]
    assert task.pool_ids == ["t1", "t2", "x"]  # every test note minus the queries, incl. x (in no kept pair)
    assert task.stats == {"pairs_read": 7, "pairs_kept": 2, "dropped_not_both_test": 1, "dropped_note_reused": 3,
                          "dropped_self_pair": 1, "test_notes": 5, "pool_notes_in_no_kept_pair": 1}
    # file order decides: the same pairs in another order keep another pair
    task2 = paper_task([PAIRS[1], PAIRS[0]], TEST_NOTES)
    assert list(zip(task2.query_ids, task2.target_ids)) == [("q1", "t2")]


def hand_built(tmp_path):
    # angles: q1 0, x 10, q2 5, t2 6, t1 30, tr (a training note) 1
    angles = {"q1": 0, "x": 10, "q2": 5, "t2": 6, "t1": 30, "tr": 1}
    ids = list(angles)
    save_embeddings(str(tmp_path / "emb"), ids, np.array([unit(a) for a in angles.values()], np.float32))
    return ids, torch.tensor([unit(a) for a in angles.values()])


def test_paper_ranks_on_hand_built_embeddings_and_k_above_the_pool(tmp_path):
    ids, emb = hand_built(tmp_path)
    task = paper_task(PAIRS, TEST_NOTES)
    rr = rank_run(task, ids, emb)
    # q1 -> t1 (30 deg): t2 (6) and x (10) ahead; q2 (5) is a query, so not in the pool; tr is no test note
    # q2 -> t2: nearest of {t1, t2, x}
    assert rr.ranks.tolist() == [2, 0] and rr.pool_size == 3
    rep = evaluate_runs([("hand", str(tmp_path / "emb"))], task, ks=[1, 2, 3, 10], resamples=50)
    run = rep["runs"][0]
    assert run["ks"] == [1, 2, 3] and run["capped"] == [10]
    assert run["subsets"]["all"]["recall"] == {"1": 0.5, "2": 0.5, "3": 1.0}
    assert rep["recall"] == run["subsets"]["all"]["recall"] and rep["pool_size"] == 3 and rep["num_pairs"] == 2


def test_a_pool_note_in_no_pair_changes_the_rank(tmp_path):
    ids, emb = hand_built(tmp_path)
    without_x = paper_task(PAIRS, [n for n in TEST_NOTES if n != "x"])
    assert without_x.pool_ids == ["t1", "t2"]
    assert rank_run(without_x, ids, emb).ranks.tolist() == [1, 0]  # only t2 ahead of t1 now


def test_all_pairs_ranks_every_embedded_note(tmp_path):
    ids, emb = hand_built(tmp_path)
    rr = rank_run(all_pairs_task([("q1", "t1"), ("q2", "t2"), ("q1", "nope")]), ids, emb)
    # q1 -> t1: tr, q2, t2, x ahead; q2 -> t2: nearest
    assert rr.ranks.tolist() == [4, 0] and rr.num_skipped == 1 and rr.pool_size == 5


def test_a_test_note_without_embedding_is_an_error_naming_it(tmp_path):
    ids, emb = hand_built(tmp_path)
    with pytest.raises(ValueError, match=r"run-a: 1 test notes have no embedding \(first: y\)"):
        rank_run(paper_task(PAIRS, TEST_NOTES + ["y"]), ids, emb, name="run-a")


# subsets and intervals ------------------------------------------------------------------------
def test_length_subsets_split_at_the_quantile():
    lengths = {"a": 1, "b": 2, "c": 3, "d": 4}
    subs, thr = length_subsets(["a", "d"], ["b", "c"], lengths, 0.5, ["a", "b", "c", "d"])
    assert thr == 2.5
    assert subs["short_query"].tolist() == [True, False] and subs["long_query"].tolist() == [False, True]
    assert subs["short_target"].tolist() == [True, False] and subs["long_target"].tolist() == [False, True]
    with pytest.raises(ValueError, match="not in it.*zz"):
        length_subsets(["zz"], ["b"], lengths, 0.5, ["zz", "b"])


def test_popularity_subsets_cold_head_and_tail():
    counts = train_pair_counts([("a", "b"), ("a", "c"), ("a", "d"), ("b", "c"), ("e", "f"), ("b", "g")])
    assert counts == {"a": 3, "b": 3, "c": 2, "d": 1, "e": 1, "f": 1, "g": 1}
    targets = ["a", "b", "c", "d", "e", "f", "new"]
    subs = popularity_subsets(targets, counts)
    assert subs["cold_start"].tolist() == [False] * 6 + [True]
    # six warm targets by count (ties by id): a3 b3 c2 | d1 e1 f1 -> head a, b; tail e, f
    assert [t for t, h in zip(targets, subs["head"]) if h] == ["a", "b"]
    assert [t for t, h in zip(targets, subs["tail"]) if h] == ["e", "f"]


def test_split_popularity_subsets_count_the_evaluated_pairs():
    # appearances among these pairs: a 3 (q, t, t), b 2, c 1, d 1, e 1 (queries count too)
    queries = ["a", "x", "y", "b", "z", "b"]
    targets = ["b", "a", "a", "c", "d", "e"]
    subs = split_popularity_subsets(queries, targets)
    # five distinct targets by count (ties by id): a3 b3 c1 d1 e1; a third is 1 -> head a, tail e
    assert [t for t, h in zip(targets, subs["pop_head"]) if h] == ["a", "a"]
    assert [t for t, h in zip(targets, subs["pop_tail"]) if h] == ["e"]
    assert not (subs["pop_head"] & subs["pop_tail"]).any()


def test_bootstrap_interval_is_seeded_and_has_the_binomial_width():
    hits = np.zeros((400, 2), dtype=bool)
    hits[:200, 0] = True
    hits[:, 1] = True
    ci = bootstrap_ci(hits, resamples=1000, seed=3)
    assert np.array_equal(ci, bootstrap_ci(hits, resamples=1000, seed=3))
    assert not np.array_equal(ci, bootstrap_ci(hits, resamples=1000, seed=4))
    half = 1.96 * math.sqrt(0.25 / 400)  # normal approximation: 0.049
    assert ci[0, 0] == pytest.approx(0.5 - half, abs=0.012) and ci[0, 1] == pytest.approx(0.5 + half, abs=0.012)
    assert ci[1].tolist() == [1.0, 1.0]


def test_evaluate_runs_reports_subsets_with_intervals(tmp_path):
    ids, emb = hand_built(tmp_path)
    task = paper_task(PAIRS, TEST_NOTES)
    lengths = {"q1": 10, "t1": 100, "q2": 100, "t2": 5, "x": 50}
    rep = evaluate_runs([("hand", str(tmp_path / "emb"))], task, ks=[1, 3], lengths=lengths,
                        train_counts={"t2": 4}, resamples=200)
    subs = rep["runs"][0]["subsets"]
    assert subs["short_query"]["n"] == 1 and subs["short_query"]["recall"] == {"1": 0.0, "3": 1.0}  # q1
    assert subs["long_query"]["recall"] == {"1": 1.0, "3": 1.0}  # q2
    assert subs["cold_start"]["n"] == 1 and subs["cold_start"]["recall"]["1"] == 0.0  # t1
    assert subs["all"]["ci"]["1"][0] <= 0.5 <= subs["all"]["ci"]["1"][1]
    assert rep["subset_rules"]["length_threshold_chars"] == 50.0


def test_bootstrap_draws_query_notes_with_all_their_pairs():
    # one query note with 9 pairs, all hits; 9 notes with one miss each: 18 pairs, recall 0.5
    hits = np.array([[True]] * 9 + [[False]] * 9)
    notes = ["a"] * 9 + [f"m{i}" for i in range(9)]
    by_pair = bootstrap_ci(hits, 1000, seed=0)
    by_note = bootstrap_ci(hits, 1000, seed=0, groups=np.array(notes, dtype=object))
    assert by_note[0, 1] - by_note[0, 0] > 1.5 * (by_pair[0, 1] - by_pair[0, 0])  # the note is the unit
    distinct = bootstrap_ci(hits, 1000, seed=0, groups=np.array([f"q{i:02d}" for i in range(18)], dtype=object))
    assert np.array_equal(distinct, by_pair)  # one pair per note: the same draws as by pair


def test_an_approximate_backend_reports_small_k_only_with_its_recall(tmp_path):
    ids, emb = hand_built(tmp_path)
    task = paper_task(PAIRS, TEST_NOTES)
    rr = rank_run(task, ids, emb, backend="faiss-hnsw")
    assert rr.ranks.tolist() == [2, 0] and rr.max_k == 3 and rr.faiss_recall == 1.0  # tiny: HNSW is exact
    logs = []
    rep = evaluate_runs([("hand", str(tmp_path / "emb"))], task, ks=[1, 3, 10], backend="faiss-hnsw",
                        resamples=20, log=logs.append)
    run = rep["runs"][0]
    assert run["ks"] == [1, 3] and run["capped"] == [10] and run["faiss_recall_vs_exact"] == 1.0
    assert logs == ["[eval] hand: faiss-hnsw recall@3 against exact search on 2 queries: 1.0000"]


def test_an_image_probe_run_skips_the_notes_without_an_image_and_others_still_fail():
    """Paper protocol: the image probe has no vector for a note without an image. Its pairs with such
    a note are skipped and counted and the note leaves its pool; any other run missing a test note
    is an error."""
    import torch as _torch

    from notellm2.launcher.eval.evaluate import paper_task, rank_run

    task = paper_task([("a", "b"), ("c", "d"), ("e", "f")], ["a", "b", "c", "d", "e", "f", "g"])
    ids = ["a", "b", "d", "e", "f", "g"]  # c has no image
    emb = _torch.eye(6)[[0, 0, 2, 3, 3, 5]].float()  # a~b and e~f identical, d and g elsewhere
    rr = rank_run(task, ids, emb, image_probe=True)
    assert rr.query_ids == ["a", "e"] and rr.target_ids == ["b", "f"] and rr.num_skipped == 1
    assert rr.pool_size == 4  # b, d, f, g (c left the pool, the queries are never in it)
    assert list(rr.ranks) == [0, 0]
    with pytest.raises(ValueError, match="1 test notes have no embedding"):
        rank_run(task, ids, emb)
