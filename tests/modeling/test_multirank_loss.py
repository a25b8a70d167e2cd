"""The gathered loss with real processes: 2 ranks x B pairs == 1 process x 2B pairs, in full gradients
of the whole tiny encoder (LLM + Q-Former connector + late-fusion gate + head + temperature); and the
encoder loads and trains under DeepSpeed ZeRO-3. One torchrun launch serves both tests."""
import math

import pytest

from tests.helpers import models as fixtures
from tests.helpers.multirank import run_ranks


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("multirank-modeling")
    llm = fixtures.make_tiny_llm_dir(root)
    clip = fixtures.make_tiny_clip_dir(root)
    res = run_ranks("tests.modeling.dist_cases:gradients_and_zero3", nproc=2, timeout=300,
                    kwargs={"llm_dir": llm, "clip_dir": clip}, env={"DS_ACCELERATOR": "cpu"})
    return res.returns


@pytest.mark.slow
def test_two_ranks_match_one_process_and_a_detached_gather_does_not(two_rank_results):
    for rank in (0, 1):
        r = two_rank_results[rank]["gradients"]
        assert r["world"] == 2 and r["n_params"] > 10_000
        assert r["missing_grads"] == []  # every trainable parameter takes part
        assert r["ref_grad_max"] > 1e-3  # the check compares real, non-vanishing gradients
        assert r["good_max_diff"] < 1e-5, r
        # Negative control: dropping the remote parts' gradient is caught by the same check.
        assert r["bad_max_diff"] > 1e-3, r
        # Per-rank losses averaged over ranks equal the single-process loss on the concatenated batch.
        assert r["good_loss"] == pytest.approx(r["ref_loss"], abs=1e-5)
    assert two_rank_results[0]["gradients"]["good_max_diff"] == pytest.approx(
        two_rank_results[1]["gradients"]["good_max_diff"], abs=1e-6)


@pytest.mark.slow
def test_loads_and_trains_under_zero3(two_rank_results):
    for rank in (0, 1):
        r = two_rank_results[rank]["zero3"]
        assert r["partitioned"], r  # the LLM really was loaded partitioned
        # A 7B is never whole on one rank: the embedding grown for the placeholders is partitioned
        # BEFORE deepspeed.initialize, each rank holding about half of it (ZeRO pads to a multiple of world).
        e = r["emb_before_engine"]
        assert e["has_ds"] and e["materialised"] == 0, e
        assert e["shape"][0] == e["vocab"] == e["config_vocab"] == 302, e
        assert e["total"] == e["shape"][0] * e["shape"][1] and 0 <= e["held"] - e["total"] / 2 < 2, e
        assert e["plain_replicated"], e  # negative control: transformers' resize gives a whole matrix
        assert r["img_emb_row_moved"] > 0, r  # the grown rows train through the engine
        assert r["emb_partitioned_by_engine"], r
        assert r["mean_err"] < 1e-6 and r["old_err"] == 0.0, r  # placeholder rows = mean, under ZeRO-3 too
        assert math.isfinite(r["loss"]) and r["logit_scale"] == pytest.approx(20.0)
        # Padded vocabulary: no resize, the rows are edited inside the partitioned matrix and kept.
        assert r["spare_partitioned"] and r["spare_rows_ok"], r
        assert r["spare_mean_err"] < 1e-6, r


def test_duplicate_pairs_on_two_ranks_give_the_deduplicated_loss_and_gradients():
    """A pair injected twice (once on the same rank, once on the other) gives exactly the loss and the
    embedding gradients of the 6 distinct pairs in one process: later copies weigh 0 and every rank
    divides by the kept count over both ranks."""
    res = run_ranks("tests.modeling.dist_cases:duplicate_pairs_match_deduplicated_batch", nproc=2, timeout=120)
    for rank in (0, 1):
        r = res.returns[rank]
        assert r["kept"] == r["kept_expected"] and r["num_kept"] == 12, r
        assert r["loss"] == pytest.approx(r["ref_loss"], abs=1e-6), r
        assert r["ref_grad_max"] > 1e-2 and r["grad_max_diff"] < 1e-6, r
        assert r["dropped_grad_max"] == 0.0, r
        # Negative control: averaging every local anchor (copies included) is a different loss.
        assert abs(r["plain_loss"] - r["ref_loss"]) > 1e-3, r
