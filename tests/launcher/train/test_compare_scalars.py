"""scripts/compare_scalars.py's verdict on hand-made metrics: exact equality of the compared scalars,
one ulp is a difference, timings are ignored, a missing step or key is a difference. (The script's
real use, two 2-rank runs, is too slow for the suite; its output is quoted in the commit that made it.)"""
from __future__ import annotations

import importlib.util
import math
import os

from tests.helpers.paths import REPO

_spec = importlib.util.spec_from_file_location("compare_scalars", os.path.join(REPO, "scripts", "compare_scalars.py"))
cs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cs)


def _rec(loss=2.5, grad=10.0, t=1.0):
    return {"step": 1, "time": t, "loss/total": loss, "lr/new": 1e-3, "model/logit_scale": 20.0,
            "optim/grad_norm": grad, "perf/step_time_s": t, "memory/rank0_mb": 400.0 * t}


def test_identical_values_pass_and_timings_are_not_compared():
    r = cs.compare({1: _rec(t=1.0)}, {1: _rec(t=2.0)})
    assert r["differences"] == [] and r["values_compared"] == 4
    assert r["keys"] == ["loss/total", "lr/new", "model/logit_scale", "optim/grad_norm"]


def test_one_ulp_is_a_difference():
    r = cs.compare({1: _rec(loss=2.5)}, {1: _rec(loss=math.nextafter(2.5, 3.0))})
    assert [(d["step"], d["key"]) for d in r["differences"]] == [(1, "loss/total")]


def test_missing_step_or_key_is_a_difference():
    head = _rec()
    del head["optim/grad_norm"]
    r = cs.compare({1: _rec(), 2: _rec()}, {1: head})
    assert {(d["step"], d["key"]) for d in r["differences"]} == {(1, "optim/grad_norm"), (2, "<step>")}


def test_ignored_prefix_is_left_out_and_either_spelling_is_run(tmp_path):
    head = _rec()
    head["lr/new"] = 2e-3
    r = cs.compare({1: _rec()}, {1: head}, ignore=("lr/",))
    assert r["differences"] == [] and "lr/new" not in r["keys"]
    assert cs.compare({1: _rec()}, {1: head})["differences"]
    old = tmp_path / "old"
    (old / "launcher").mkdir(parents=True)
    assert cs.launcher_module(str(old)) == "launcher"
    assert cs.launcher_module(REPO) == "notellm2.launcher"
