"""The reference rows without training (notellm2.launcher.eval.reference), each on hand-built inputs and
through the same evaluation as the embeddings: BM25 over the note text, the category oracle, the
frozen tower's pooled features from a vision cache."""
import json
import sys

import numpy as np
import pytest

from notellm2.data_shards.catalog.notes import Note
from notellm2.launcher.eval.evaluate import EvalInputError, all_pairs_task, evaluate_runs, paper_task
from notellm2.launcher.eval.reference import ReferenceError, ReferenceSpec, parse_reference


def test_reference_specs():
    assert parse_reference("bm25") == ReferenceSpec("bm25", "bm25")
    assert parse_reference("oracle=category") == ReferenceSpec("oracle", "category")
    assert parse_reference("lite2=tower:/c/lite2") == ReferenceSpec("lite2", "tower", "/c/lite2")
    for spec, msg in [("tfidf", "unknown kind 'tfidf'"), ("tower", "needs its vision cache"),
                      ("bm25:x", "bm25 takes no argument"), ("=bm25", "an empty name")]:
        with pytest.raises(ReferenceError, match=msg):
            parse_reference(spec)


# --------------------------------------------------------------------------------------- BM25
NOTES = [  # queries q*, their targets t*, distractors d*; e1/e2 have no text at all
    Note("q1", "red fox", "a red fox jumps", topics=["wildlife"]),
    Note("t1", "fox", "the red fox den", topics=["wildlife"]),
    Note("q2", "", "", topics=[]),
    Note("t2", "blue whale", "ocean"),
    Note("q3", "tea", "green tea leaves"),
    Note("t3", "", ""),
    Note("d1", "green car", "fast"),
    Note("d2", "whale song", "deep ocean"),
    Note("e1", "", ""),
    Note("e2", "the", "of and"),  # stop words only: no words either
]
PAIRS = [("q1", "t1"), ("q2", "t2"), ("q3", "t3")]
TEST = [n.note_id for n in NOTES]


def counts(rep, name):
    run = next(r for r in rep["runs"] if r["name"] == name)
    return run["queries"]["greater"], run["queries"]["equal"]


def test_bm25_ranks_by_shared_words_and_empty_text_scores_zero_everywhere():
    pytest.importorskip("bm25s")
    task = paper_task(PAIRS, TEST)  # pool: t1 t2 t3 d1 d2 e1 e2 (7)
    rep = evaluate_runs([], task, ks=[1, 7], references=[ReferenceSpec("bm25", "bm25")], catalog_notes=NOTES,
                        catalog_path="catalog.jsonl", resamples=20)
    greater, equal = counts(rep, "bm25")
    # q1 -> t1: t1 shares red/fox/wildlife, nothing else does: first, no tie
    # q2 (no words) -> every pool note scores 0: the target ties with the 6 others (chance)
    # q3 -> t3 (no words): d1 shares "green" and scores above; t3 ties at 0 with the 5 others
    assert greater == [0, 0, 1] and equal == [0, 6, 5]
    run = rep["runs"][0]
    assert run["kind"] == "reference" and run["reference"] == "bm25"
    assert run["subsets"]["all"]["recall"]["1"] == pytest.approx((1 + 1 / 7 + 0) / 3)


def test_bm25_counts_equal_a_direct_count_of_the_librarys_scores():
    """The plumbing: the counts equal those of bm25s' own scores for each query against the pool."""
    bm25s = pytest.importorskip("bm25s")
    from notellm2.launcher.eval.subsets import note_text

    task = paper_task(PAIRS, TEST)
    rep = evaluate_runs([], task, ks=[1], references=[ReferenceSpec("bm25", "bm25")], catalog_notes=NOTES,
                        resamples=10)
    by_id = {n.note_id: n for n in NOTES}
    words = bm25s.tokenize([note_text(by_id[p]) for p in task.pool_ids], stopwords="en", return_ids=False,
                           show_progress=False)
    retriever = bm25s.BM25()
    retriever.index([list(w) for w in words], show_progress=False)
    greater, equal = counts(rep, "bm25")
    for i, (q, t) in enumerate(zip(task.query_ids, task.target_ids)):
        qw = bm25s.tokenize([note_text(by_id[q])], stopwords="en", return_ids=False, show_progress=False)[0]
        known = [w for w in qw if w in retriever.vocab_dict and w]
        s = retriever.get_scores(known) if known else np.zeros(len(task.pool_ids), np.float32)
        j = task.pool_ids.index(t)
        others = np.delete(s, j)
        assert (greater[i], equal[i]) == (int((others > s[j]).sum()), int((others == s[j]).sum()))


def test_bm25_missing_is_one_line_naming_the_extra(monkeypatch):
    from notellm2.errors import MissingExtra

    monkeypatch.setitem(sys.modules, "bm25s", None)
    with pytest.raises(MissingExtra, match=r"BM25 reference row.*pip install 'notellm2\[bench\]'"):
        evaluate_runs([], paper_task(PAIRS, TEST), ks=[1], references=[ReferenceSpec("bm25", "bm25")],
                      catalog_notes=NOTES, resamples=10)


def test_references_need_the_paper_protocol_and_the_catalog():
    with pytest.raises(EvalInputError, match="--reference bm25: reference rows need --protocol paper"):
        evaluate_runs([], all_pairs_task(PAIRS), ks=[1], references=[ReferenceSpec("bm25", "bm25")],
                      catalog_notes=NOTES)
    with pytest.raises(EvalInputError, match="--reference category: needs --catalog"):
        evaluate_runs([], paper_task(PAIRS, TEST), ks=[1], references=[ReferenceSpec("category", "category")])


# ---------------------------------------------------------------------------- category oracle
def test_category_oracle_is_the_ceiling_under_fair_ties():
    cats = {"q1": "a", "t1": "a", "p1": "a", "p2": "a", "q2": "b", "t2": "a", "p3": "b", "q3": "c", "t3": "c",
            "p4": None, "q4": None, "t4": None}
    notes = [Note(n, n, "", category=c) for n, c in cats.items()]
    task = paper_task([("q1", "t1"), ("q2", "t2"), ("q3", "t3"), ("q4", "t4")], list(cats))
    rep = evaluate_runs([], task, ks=[1, 3], references=[ReferenceSpec("oracle", "category")], catalog_notes=notes,
                        catalog_path="c.jsonl", resamples=10)
    greater, equal = counts(rep, "oracle")
    # pool: t1 p1 p2 t2 p3 t3 p4 t4. q1 (a) -> t1: tied with p1, p2, t2 (a). q2 (b) -> t2 (a): p3 (b) above,
    # tied at 0 with the 6 others. q3 (c) -> t3: the only c. q4 (no category) matches nothing: all tie at 0
    assert greater == [0, 1, 0, 0] and equal == [3, 6, 0, 7]
    assert rep["runs"][0]["subsets"]["all"]["recall"]["1"] == pytest.approx((1 / 4 + 0 + 1 + 1 / 8) / 4)
    with pytest.raises(ReferenceError, match="the catalog c.jsonl gives no note a category"):
        evaluate_runs([], task, ks=[1], references=[ReferenceSpec("category", "category")],
                      catalog_notes=[Note(n, n, "") for n in cats], catalog_path="c.jsonl")


# ------------------------------------------------------------------------------ tower features
def write_cache(path, ids, pooled, bad=()):
    from notellm2.data_shards.vision_cache import CacheWriter

    w = CacheWriter(str(path), len(ids), ["plain"], 2, 3, pooled.shape[1])
    good = [i for i, n in enumerate(ids) if n not in bad]
    w.put(0, good, np.zeros((len(good), 2, 3), np.float32), pooled[good])
    w.skip([i for i, n in enumerate(ids) if n in bad] + [len(ids)])
    w.commit(ids, {n: ["decode", "not an image"] for n in bad},
             {"tower_key": "0" * 64, "tower": {"factory": "hand-built"}, "image_size": 32, "shards": {},
              "max_image_pixels": 1000})
    return str(path)


def test_tower_features_rank_by_cosine_and_skip_notes_without_an_image(tmp_path):
    """The cache's pooled features, normalised: q1's target is its nearest pool note; q2's target has
    no image (not in the cache) and q3's image is bad: both pairs are skipped and counted, and those
    notes leave the pool, as with the image probe."""
    ids = ["q1", "t1", "d1", "d2", "q3", "t3"]  # t2 (no image) is absent; q3's image is bad
    pooled = np.array([[10, 1, 0], [9, 2, 0], [0, 5, 5], [1, 9, 0], [1, 1, 1], [1, 1, 1]], np.float32)
    cache = write_cache(tmp_path / "cache", ids, pooled, bad=("q3",))
    test = ["q1", "t1", "q2", "t2", "q3", "t3", "d1", "d2"]
    task = paper_task([("q1", "t1"), ("q2", "t2"), ("q3", "t3")], test)
    rep = evaluate_runs([], task, ks=[1], references=[ReferenceSpec("tower", "tower", cache)], resamples=10)
    run = rep["runs"][0]
    assert run["queries"]["query_id"] == ["q1"] and run["queries"]["greater"] == [0]
    assert run["num_skipped"] == 2 and run["pool_size"] == 4  # t1 d1 d2 t3
    assert run["notes"] == 5 and run["bad_images_left_out"] == 1 and run["tower"] == {"factory": "hand-built"}
    # scaling a feature does not move it (cosine): the same counts with q1's vector x 100
    pooled[0] *= 100
    rep2 = evaluate_runs([], task, ks=[1], references=[ReferenceSpec("tower", "tower",
                                                                    write_cache(tmp_path / "c2", ids, pooled, ("q3",)))],
                         resamples=10)
    assert rep2["runs"][0]["queries"]["greater"] == [0]
    with pytest.raises(ReferenceError, match="--reference tower: data.vision_cache: .* does not exist"):
        evaluate_runs([], task, ks=[1], references=[ReferenceSpec("tower", "tower", str(tmp_path / "none"))])
    json.dumps(rep)  # the report stays JSON
