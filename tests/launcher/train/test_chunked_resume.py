"""A chunked run (`train.chunk_pairs`, Q-Former dropout on) through the `notellm2 train` CLI on 2 CPU
ranks (ZeRO-3, tiny Llama + tiny CLIP + real shards): killed with SIGKILL at the start of step 3 and
resumed, it logs the same per-step losses and gradient norms as an unbroken chunked run."""
from __future__ import annotations

import pytest

from notellm2.launcher.train import checkpoint as ckpt
from tests.helpers.multirank import run_command
from tests.helpers.real_setup import build_inputs, write_config
from tests.helpers.runs import metrics_by_step

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
    r = run_command(["-m", "notellm2.launcher", "train", "--config", cfg, *dropout], nproc=2, timeout=400,
                    env={"NOTELLM2_TEST_DIE_AT": "1:3"}, check=False)
    assert r.returncode != 0
    assert ckpt.latest_complete(ckpt.checkpoint_root(run_dir)).endswith("step_00000002")
    r = run_command(["-m", "notellm2.launcher", "train", "--config", cfg, *dropout], nproc=2, timeout=400)
    assert "resumed step 2" in r.output
    ref, got = metrics_by_step(ref_dir), metrics_by_step(run_dir)
    assert sorted(got) == sorted(ref) == [1, 2, 3, 4]
    for s in range(1, 5):
        for key in ("loss/total", "loss/mm", "loss/vis", "optim/grad_norm", "model/gate_mean"):
            assert got[s][key] == ref[s][key], (s, key, got[s][key], ref[s][key])
    assert len({ref[s]["loss/total"] for s in ref}) == 4  # the losses moved
