"""`loss.logq_correction` and `loss.mask_known_positives` through the `notellm2 train` CLI on 2 CPU ranks
(ZeRO-3, tiny Llama + tiny CLIP, real shards from write-shards with their note_stats.parquet), in chunks
and with validation: the loaders add the per-note inputs, the run trains, and its loss is another than
the plain run's from the same start."""
from __future__ import annotations

import math

import pytest

from tests.helpers.multirank import run_command
from tests.helpers.real_setup import build_inputs, write_config
from tests.helpers.runs import metrics_by_step

pytestmark = pytest.mark.slow

OPTIONS = ["loss.logq_correction=true", "loss.mask_known_positives=true"]


def test_both_options_train_in_chunks_with_validation(tmp_path):
    inputs = build_inputs(str(tmp_path / "inputs"))
    cfg = write_config(str(tmp_path / "negs.yaml"), inputs, str(tmp_path / "negs"), chunk_pairs=2, precision="fp32")
    r = run_command(["-m", "notellm2.launcher", "train", "--config", cfg, *OPTIONS], nproc=2, timeout=400)
    assert "in chunks of 2 pairs" in r.output
    got = metrics_by_step(str(tmp_path / "negs"))
    assert sorted(got) == [1, 2, 3, 4] and all(math.isfinite(got[s]["loss/total"]) for s in got)
    plain_cfg = write_config(str(tmp_path / "plain.yaml"), inputs, str(tmp_path / "plain"), precision="fp32",
                             max_steps=1)
    run_command(["-m", "notellm2.launcher", "train", "--config", plain_cfg], nproc=2, timeout=400)
    plain = metrics_by_step(str(tmp_path / "plain"))
    assert abs(plain[1]["loss/total"] - got[1]["loss/total"]) > 1e-3, (plain[1], got[1])
