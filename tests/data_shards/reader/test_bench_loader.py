"""The loader benchmark runs end to end (tiny), so it cannot rot; timings are not asserted, but the
RESULT line must agree with itself and with what the run counted."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers.bench_results import check_result, result_lines
from tests.helpers.paths import REPO


def test_bench_loader_tiny_run_prints_result():
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "bench_loader.py"), "--pairs", "48", "--image-px", "48",
           "--num-shards", "4", "--ranks", "2", "--workers", "2", "--batch", "4", "--size", "32", "--repeats", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (result,) = result_lines(proc.stdout)
    assert result["name"] == "bench_loader" and result["unit"] == "pairs/s"
    check_result(result, ">=", 0.8, digits=2, ratio_digits=4)
    # one repeat: the best runs are the only runs, so the paired ratio is the ratio itself
    assert len(result["paired_ratios"]) == 1 and abs(result["paired_ratios"][0] - result["ratio"]) <= 1e-4
    # 48 pairs in 4 shards of 12 over 2 ranks: 24 pairs per rank, 6 batches of 4 each; the raw bound
    # decodes both images of every pair
    assert result["pairs"] == 48 and (result["ranks"], result["workers"]) == (2, 2)
    assert "decode+resize+crop 96 JPEGs" in proc.stdout and "batches per rank [6, 6]" in proc.stdout
    # the 12 batches' pixels came through the reused shared slots, as in training
    assert result["pixels_moved"] == {"slots": 12, "ordinary": 0}
