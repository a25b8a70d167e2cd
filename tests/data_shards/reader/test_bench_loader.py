"""The loader benchmark runs end to end (tiny), so it cannot rot; timings are not asserted."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.helpers.paths import REPO
def test_bench_loader_tiny_run_prints_result():
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "bench_loader.py"), "--pairs", "48", "--image-px", "48",
           "--num-shards", "4", "--ranks", "2", "--workers", "2", "--batch", "4", "--size", "32", "--repeats", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("RESULT ")
    result = json.loads(lines[-1][len("RESULT "):])
    assert {"name", "figure", "bound_or_baseline", "ratio", "target", "pass"} <= set(result)
    assert result["name"] == "bench_loader" and result["figure"] > 0 and result["bound_or_baseline"] > 0
    assert abs(result["ratio"] - result["figure"] / result["bound_or_baseline"]) < 0.01
    # 48 pairs in 4 shards of 12 over 2 ranks: 24 pairs per rank, 6 batches of 4 each
    assert result["pairs"] == 48
    # the 12 batches' pixels came through the reused shared slots, as in training
    assert result["pixels_moved"] == {"slots": 12, "ordinary": 0}
    assert len(result["paired_ratios"]) == 1
