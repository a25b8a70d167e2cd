"""scripts/eval_cost.py: the share of training time the in-training evaluations take."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.helpers.paths import REPO


def test_share_counts_the_first_evaluation_once_and_the_later_ones_for_the_rest(tmp_path):
    rows = [{"step": 1, "perf/step_time_s": 99.0}]  # step 1 (start-up) is left out of the mean
    rows += [{"step": s, "perf/step_time_s": 2.0} for s in range(2, 21)]
    rows[-1]["perf/eval_s"] = 30.0  # step 20: the first evaluation (the tower runs)
    rows += [{"step": s, "perf/step_time_s": 4.0} for s in range(21, 41)]
    rows[-1]["perf/eval_s"] = 10.0
    with open(tmp_path / "metrics.jsonl", "w") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows))
    out = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "eval_cost.py"), str(tmp_path),
                          "--every", "40", "--steps", "120"], capture_output=True, text=True, check=True).stdout
    res = json.loads(out.strip().splitlines()[-1].removeprefix("RESULT "))
    step = (18 * 2.0 + 19 * 4.0) / 37  # the steps without an evaluation, step 1 excluded
    assert abs(res["step_s"] - step) < 1e-9
    assert abs(res["share"] - (30.0 + 2 * 10.0) / (120 * step)) < 1e-9 and res["met"] is False
