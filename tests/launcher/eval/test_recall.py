"""Recall@K: the paper protocol's pair selection and pool, ranks on hand-built embeddings, capped K,
subsets with intervals, n/a subsets (notellm2.launcher.eval.evaluate; the metrics' closed forms and the
bootstrap itself: test_metrics.py)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from notellm2.launcher.eval.evaluate import (all_pairs_task, evaluate_runs, paper_task, rank_run, recall_at_k,
                                             save_embeddings, target_ranks)
from notellm2.launcher.eval.subsets import (length_subsets, popularity_subsets, split_popularity_subsets,
                                            train_pair_counts)


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


def test_constant_embeddings_score_chance_fair_and_last_pessimistic():
    pool = F.normalize(torch.ones(10, 4), dim=1)
    pairs = [("0", "1"), ("2", "3")]
    rep = recall_at_k(pool, [str(i) for i in range(10)], pairs, [1, 8, 9])
    assert rep.recall == pytest.approx({1: 1 / 9, 8: 8 / 9, 9: 1.0}) and rep.mean_rank == 5.0  # 9 candidates
    rep = recall_at_k(pool, [str(i) for i in range(10)], pairs, [1, 8, 9], ties="pessimistic")
    assert rep.recall[1] == 0.0 and rep.recall[8] == 0.0 and rep.recall[9] == 1.0 and rep.mean_rank == 9.0


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
    assert rr.greater.tolist() == [2, 0] and rr.equal.tolist() == [0, 0] and rr.pool_size == 3
    rep = evaluate_runs([("hand", str(tmp_path / "emb"))], task, ks=[1, 2, 3, 10], resamples=50)
    run = rep["runs"][0]
    assert run["ks"] == [1, 2, 3] and run["capped"] == [10]
    assert run["subsets"]["all"]["recall"] == {"1": 0.5, "2": 0.5, "3": 1.0}
    assert rep["recall"] == run["subsets"]["all"]["recall"] and rep["pool_size"] == 3 and rep["num_pairs"] == 2


def test_a_pool_note_in_no_pair_changes_the_rank(tmp_path):
    ids, emb = hand_built(tmp_path)
    without_x = paper_task(PAIRS, [n for n in TEST_NOTES if n != "x"])
    assert without_x.pool_ids == ["t1", "t2"]
    assert rank_run(without_x, ids, emb).greater.tolist() == [1, 0]  # only t2 ahead of t1 now


def test_all_pairs_ranks_every_embedded_note(tmp_path):
    ids, emb = hand_built(tmp_path)
    rr = rank_run(all_pairs_task([("q1", "t1"), ("q2", "t2"), ("q1", "nope")]), ids, emb)
    # q1 -> t1: tr, q2, t2, x ahead; q2 -> t2: nearest
    assert rr.greater.tolist() == [4, 0] and rr.num_skipped == 1 and rr.pool_size == 5


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
    # text_poor (fewer than 20 characters at either end): q1 (10) -> t1, q2 -> t2 (5): every pair, so n/a
    assert subs["text_poor"] == {"n": 2, "na": "equals all: every one of the 2 evaluated pairs is in it"}
    assert subs["text_rich"] == {"n": 0, "na": "empty: no evaluated pair is in it"}
    # the per-query record a paired test reads from the report alone
    q = rep["runs"][0]["queries"]
    assert (q["query_id"], q["target_id"], q["greater"], q["equal"]) == (["q1", "q2"], ["t1", "t2"], [2, 0], [0, 0])
    assert q["subset_rows"]["short_query"] == [0] and "text_poor" not in q["subset_rows"]
    rep = evaluate_runs([("hand", str(tmp_path / "emb"))], task, ks=[1, 3], lengths=lengths, train_counts={"t2": 4},
                        resamples=200, text_poor_chars=8)
    subs = rep["runs"][0]["subsets"]
    assert subs["text_poor"]["n"] == 1 and subs["text_poor"]["recall"]["1"] == 1.0  # only t2 (5) is below 8
    assert subs["text_rich"]["n"] == 1 and subs["text_rich"]["recall"]["1"] == 0.0


def test_cold_start_equal_to_all_and_empty_head_tail_are_na(tmp_path):
    """Test notes held out of training: every target is cold, so cold_start is all and head/tail are
    empty. They are n/a with the reason, not a second copy of `all` or an empty figure."""
    ids, emb = hand_built(tmp_path)
    task = paper_task(PAIRS, TEST_NOTES)
    rep = evaluate_runs([("hand", str(tmp_path / "emb"))], task, ks=[1], train_counts={"tr": 3}, resamples=20)
    subs = rep["runs"][0]["subsets"]
    assert subs["cold_start"]["na"].startswith("equals all") and "recall" not in subs["cold_start"]
    assert subs["head"]["na"].startswith("empty") and subs["tail"]["na"].startswith("empty")


def test_nan_embeddings_are_refused_naming_the_run_and_notes(tmp_path):
    from notellm2.launcher.eval.evaluate import EvalInputError

    ids, emb = hand_built(tmp_path)
    bad = emb.numpy().copy()
    bad[ids.index("x"), 0] = np.nan
    save_embeddings(str(tmp_path / "nan"), ids, bad)
    with pytest.raises(EvalInputError, match=r"^broken \(.*nan\): 1 embeddings hold NaN or inf \(first: x\)"):
        evaluate_runs([("broken", str(tmp_path / "nan"))], paper_task(PAIRS, TEST_NOTES), ks=[1], resamples=10)


def test_paired_runs_from_the_reports_alone(tmp_path):
    """--baseline's paired bootstrap reads only the report: written to JSON and read back it gives the
    same figures; the difference is that of the two runs' per-query metrics on the same draws."""
    import json

    from notellm2.launcher.eval import metrics
    from notellm2.launcher.eval.evaluate import paired_runs, query_metrics

    rng = np.random.default_rng(0)
    ids = [f"n{i:02d}" for i in range(40)]
    pairs = [(ids[i], ids[i + 20]) for i in range(20)]
    close = rng.normal(size=(40, 8)).astype(np.float32)
    close[20:] = close[:20] + 0.3 * rng.normal(size=(20, 8)).astype(np.float32)  # targets near their queries
    save_embeddings(str(tmp_path / "good"), ids, close)
    save_embeddings(str(tmp_path / "random"), ids, rng.normal(size=(40, 8)).astype(np.float32))
    save_embeddings(str(tmp_path / "const"), ids, np.ones((40, 8), np.float32))
    task = paper_task(pairs, ids)
    rep = evaluate_runs([("random", str(tmp_path / "random")), ("good", str(tmp_path / "good")),
                         ("const", str(tmp_path / "const"))], task, ks=[1, 5], resamples=300, seed=7,
                        baseline="random")
    back = json.loads(json.dumps(rep))
    assert paired_runs(back, "random") == rep["paired"]
    good = rep["paired"]["runs"][0]
    assert good["name"] == "good" and good["n"] == 20 and good["only_in_run"] == 0
    runs = {r["name"]: r for r in rep["runs"]}
    want = query_metrics(runs["good"]["queries"], [1, 5], "fair") - query_metrics(runs["random"]["queries"], [1, 5], "fair")
    ci = metrics.bootstrap_ci(want, 300, 7, 0.95, np.array(runs["random"]["queries"]["query_id"], dtype=object))
    got = good["subsets"]["all"]
    cells = [got["recall"]["1"], got["recall"]["5"], got["ndcg"]["1"], got["ndcg"]["5"], got["mrr"]]
    assert [c["diff"] for c in cells] == pytest.approx(list(want.mean(0)))
    assert [c["ci"] for c in cells] == [list(row) for row in ci]  # the same draws as the runs' own intervals
    assert good["subsets"]["all"]["recall"]["5"]["ci"][0] > 0  # near targets beat random vectors
    # the constant encoder scores chance under fair ties: its R@1 is 1/20 for every query
    assert runs["const"]["subsets"]["all"]["recall"]["1"] == pytest.approx(1 / 20)


def test_an_approximate_backend_reports_small_k_only_with_its_recall(tmp_path):
    ids, emb = hand_built(tmp_path)
    task = paper_task(PAIRS, TEST_NOTES)
    rr = rank_run(task, ids, emb, backend="faiss-hnsw")
    assert rr.greater.tolist() == [2, 0] and rr.max_k == 3 and rr.faiss_recall == 1.0  # tiny: HNSW is exact
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
    assert list(rr.greater) == [0, 0]
    with pytest.raises(ValueError, match="1 test notes have no embedding"):
        rank_run(task, ids, emb)
