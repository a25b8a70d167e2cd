"""scripts/run_dynamics.py (issue #26 item 6): the first- and last-window means of a run's logged losses,
gate and temperature, from a hand-built metrics.jsonl, with the in-batch chance level from its config and
the ranks its metrics name; a metric the run does not log shows as '-'; a damaged line names file and line."""
from __future__ import annotations

import json
import math
import os
import sys

import pytest

from tests.helpers.paths import REPO

sys.path.insert(0, os.path.join(REPO, "scripts"))
import run_dynamics  # noqa: E402


def _run(tmp_path, name, rows, per_rank=8):
    d = tmp_path / name / "run"
    d.mkdir(parents=True)
    (d / "config.resolved.yaml").write_text(f"data:\n  pairs_per_rank: {per_rank}\n")
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(tmp_path / name)


def test_first_and_last_windows_and_the_chance_level(tmp_path, capsys):
    rows = [{"step": s, "loss/total": 4.0 - s / 10, "loss/vis": 3.0 + (s > 3), "model/logit_scale": 20.0 + s,
             "memory/rank0_mb": 1.0, "memory/rank1_mb": 1.0} for s in range(1, 7)]
    run = _run(tmp_path, "a", rows)
    got = run_dynamics.dynamics(run, window=2)
    assert got["steps"] == 6 and got["loss/vis"] == (3.0, 4.0)
    assert got["model/logit_scale"] == (21.5, 25.5)
    assert got["model/gate_mean"] is None and got["loss/mm"] is None
    assert got["chance"] == pytest.approx(math.log(31))  # 2 ranks x 8 pairs x 2 notes, less the anchor
    assert run_dynamics.main([run, "--window", "2"]) == 0
    out = capsys.readouterr().out
    assert "| a | 6 | 3.43 | 3.000 -> 4.000 | - | - | 21.500 -> 25.500 |" in out
    assert out.splitlines()[-1].startswith("RESULT ")


def test_a_damaged_line_names_the_file_and_line(tmp_path):
    run = _run(tmp_path, "b", [{"step": 1, "loss/total": 1.0}])
    with open(os.path.join(run, "run", "metrics.jsonl"), "a") as fh:
        fh.write("{not json\n")
    with pytest.raises(SystemExit, match=r"metrics.jsonl:2: not JSON"):
        run_dynamics.dynamics(run)
    with pytest.raises(SystemExit, match="has no metrics.jsonl"):
        run_dynamics.dynamics(str(tmp_path / "missing"))
