"""A tiny run of benchmarks/bench_write_shards.py (24 small synthetic notes, 1 and 2 workers, one repeat),
so that it cannot rot: timings are not asserted; the RESULT line must agree with itself and with the
byte-identity it reports."""
from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.helpers.bench_results import check_result, result_lines
from tests.helpers.paths import REPO


def test_bench_write_shards_tiny_run_prints_result():
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "bench_write_shards.py"), "--notes", "24",
           "--source-size", "64", "--n-pairs", "24", "--workers", "2", "--repeats", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (result,) = result_lines(proc.stdout)
    assert result["name"] == "write_shards_images_per_s_2_workers" and result["target"] == 1.3
    identical = re.search(r"outputs byte-identical across all runs: (True|False)", proc.stdout)
    assert identical and identical.group(1) == "True", proc.stdout  # 1 and 2 workers wrote the same bytes
    # the figure is 2 workers' images/s, the baseline 1 worker's, both from the run lines printed above
    runs = {int(w): float(rate) for w, rate in re.findall(r"run 0 workers=(\d): [\d.]+ s \(([\d.]+) images/s\)",
                                                          proc.stdout)}
    assert set(runs) == {1, 2}
    assert abs(result["figure"] - runs[2]) <= 0.06 and abs(result["bound_or_baseline"] - runs[1]) <= 0.06
    check_result(result, ">=", 1.3, digits=2, ratio_digits=3, also=True)
