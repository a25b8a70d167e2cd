"""The whole training step through the DeepSpeed engine (issue #10): the `notellm2` model (tiny Llama +
tiny CLIP + Q-Former + late-fusion gate + mICL), ZeRO-3, fp32, client torch AdamW, wrapped by
`deepspeed.initialize` as the trainer does, gives on 2 real gloo ranks x B pairs the same loss (mean
over ranks) and the same full gradients (`safe_get_full_grad`) as on 1 rank x 2B pairs (the same
pairs). The negative control - the same 2-rank run with `loss.scale_by_world_size: true`, whose
gradients are halved - must be rejected by the very same check."""
from __future__ import annotations

import os

import pytest
import torch

from tests.helpers import models as fixtures
from tests.helpers.multirank import run_ranks

pytestmark = pytest.mark.slow

PAIRS_PER_RANK = 2  # B
REL_TOL = 1e-5      # agreement, relative to max|g_ref| over all parameters
MIN_SIGNAL = 1e-3   # the guards: real gradients, and a negative control the check can see


def compare(ref: dict, got: dict) -> dict:
    """Max |got - ref| over every parameter's full gradient, relative to max |ref|; and the worst parameters."""
    assert sorted(ref) == sorted(got), set(ref) ^ set(got)
    ref_max = max(g.abs().max().item() for g in ref.values())
    diffs = {n: (got[n] - ref[n]).abs().max().item() for n in ref}
    max_diff = max(diffs.values())
    worst = sorted(diffs.items(), key=lambda kv: -kv[1])[:3]
    return {"ref_max": ref_max, "max_diff": max_diff, "rel": max_diff / ref_max, "ok": max_diff <= REL_TOL * ref_max,
            "worst": worst}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine-grads")
    llm = fixtures.make_tiny_llm_dir(root, arch="llama", num_layers=2, hidden=64)
    clip = fixtures.make_tiny_clip_dir(root, hidden=32, layers=2)
    out = str(root / "grads")
    os.makedirs(out)
    kwargs = {"llm_dir": llm, "clip_dir": clip, "total_pairs": 2 * PAIRS_PER_RANK, "out_dir": out}
    env = {"DS_ACCELERATOR": "cpu", "MULTIRANK_PG_TIMEOUT": "120"}
    one = run_ranks("tests.launcher.train.engine_grad_cases:one_step_gradients", nproc=1, timeout=300,
                    kwargs={**kwargs, "scales": [False]}, env=env)
    two = run_ranks("tests.launcher.train.engine_grad_cases:one_step_gradients", nproc=2, timeout=300,
                    kwargs={**kwargs, "scales": [False, True]}, env=env)
    files = {tag: torch.load(os.path.join(out, f"{tag}.pt")) for tag in ("world1-scale0", "world2-scale0", "world2-scale1")}
    return {"one": one.returns[0], "two": two.returns, "files": files}


def test_two_ranks_through_the_engine_match_one_rank_in_loss_and_full_gradients(runs):
    ref_info, two = runs["one"]["world1-scale0"], runs["two"]
    files = runs["files"]
    for info in (ref_info, two[0]["world2-scale0"], two[1]["world2-scale0"]):
        assert info["partitioned"], info          # ZeRO-3 really owns every parameter
        assert info["missing"] == [], info        # every trainable parameter got a gradient
        assert info["dropouts"] == [], info       # deterministic forwards
        assert info["scale_by_world_size"] is False
    # each of the 2 ranks holds about half of every parameter (the 1-rank engine all of it)
    assert ref_info["held_fraction"] == 1.0
    assert all(abs(two[r]["world2-scale0"]["held_fraction"] - 0.5) < 0.01 for r in (0, 1)), two
    # Both launches started from the same weights (same seed, same tiny checkpoint dirs).
    ref_init, got_init = files["world1-scale0"]["initial"], files["world2-scale0"]["initial"]
    assert sorted(ref_init) == sorted(got_init)
    assert all(torch.equal(ref_init[n], got_init[n]) for n in ref_init)
    assert sum(g.numel() for g in files["world1-scale0"]["grads"].values()) > 100_000

    # The loss: mean over ranks of the per-rank losses == the single-rank loss on the concatenated batch.
    assert two[0]["world2-scale0"]["mean_loss"] == two[1]["world2-scale0"]["mean_loss"]
    assert two[0]["world2-scale0"]["mean_loss"] == pytest.approx(ref_info["mean_loss"], rel=1e-5)

    good = compare(files["world1-scale0"]["grads"], files["world2-scale0"]["grads"])
    assert good["ref_max"] > MIN_SIGNAL, good     # guard: gradients that are not vanishing
    assert good["ok"], good


def test_scaled_by_world_size_is_rejected_by_the_same_check(runs):
    """Negative control: the paper's 1/world_size convention halves loss and gradients on 2 ranks."""
    info = runs["two"][0]["world2-scale1"]
    assert info["scale_by_world_size"] is True and info["missing"] == []
    files = runs["files"]
    assert all(torch.equal(files["world1-scale0"]["initial"][n], files["world2-scale1"]["initial"][n])
               for n in files["world1-scale0"]["initial"])
    bad = compare(files["world1-scale0"]["grads"], files["world2-scale1"]["grads"])
    assert bad["max_diff"] > MIN_SIGNAL, bad      # guard: the control is visible to the check
    assert not bad["ok"], bad
    assert info["mean_loss"] == pytest.approx(runs["one"]["world1-scale0"]["mean_loss"] / 2, rel=1e-5)
