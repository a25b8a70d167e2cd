"""A chunked run (`train.chunk_pairs`, Q-Former dropout on) through the `notellm2 train` CLI on 2 CPU
ranks (ZeRO-3, tiny Llama + tiny CLIP + real shards): killed with SIGKILL at the start of step 3 and
resumed, it logs the same per-step losses and gradient norms as an unbroken chunked run."""
from __future__ import annotations

import pytest

from tests.helpers.multirank import run_command
from tests.helpers.real_setup import build_inputs, write_config
from tests.helpers.runs import assert_same_steps, kill_and_resume

pytestmark = pytest.mark.slow


def _config(tmp, inputs, name):
    run_dir = str(tmp / name)
    cfg = write_config(str(tmp / f"{name}.yaml"), inputs, run_dir, chunk_pairs=2, precision="fp32")
    return cfg, run_dir


def test_chunked_run_resumes_exactly_after_kill(tmp_path):
    inputs = build_inputs(str(tmp_path / "inputs"))
    ref_cfg, ref_dir = _config(tmp_path, inputs, "ref")
    dropout = ["model.connector.dropout=0.1"]
    r = run_command(["-m", "notellm2.launcher", "train", "--config", ref_cfg, *dropout], nproc=2, timeout=400)
    assert "in chunks of 2 pairs" in r.output
    cfg, run_dir = _config(tmp_path, inputs, "killed")
    kill_and_resume(cfg, run_dir, dropout)
    assert_same_steps(ref_dir, run_dir, 4)
