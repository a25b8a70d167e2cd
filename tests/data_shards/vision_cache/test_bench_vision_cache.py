"""The vision-cache benchmark runs end to end (tiny models, 1 rank, 4 steps), so it cannot rot. Timings
are not asserted; what the run did is: the steps alternate, the tower runs on the pixel steps and never
on the cached ones, the cache holds the tiny CLIP's features, and the RESULT line agrees with itself."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.helpers.bench_results import check_result, result_lines
from tests.helpers.paths import REPO


@pytest.mark.slow
def test_bench_vision_cache_tiny_run_prints_result():
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "bench_vision_cache.py"), "--tiny", "--steps", "4",
           "--warmup", "1", "--ranks", "1", "--pairs", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (result,) = result_lines(proc.stdout)
    assert result["name"] == "bench_vision_cache" and result["target"] == ">= 0.8"
    # steps 1..4 alternate pixels / cached: the tower ran once on each pixel step (1 and 3), never on a
    # cached one (2 and 4); after the warm-up step, pixel step 3 and cached steps 2 and 4 are measured
    assert result["tower_forwards"] == {"pixels": 2, "cached": 0}, result
    assert result["measured_steps"] == [1, 2]
    # the figure is the step time the cache saved, the bound the tower's time on a pixel step
    assert abs(result["figure"] - (result["step_s_without_cache"] - result["step_s_with_cache"])) <= 1.5e-4
    assert result["bound_or_baseline"] == result["tower_s_per_step"]
    check_result(result, ">=", 0.8, digits=4, ratio_digits=4)
    # the tiny CLIP at 32 px, patch 8: 16 patch tokens of width 32, plus the pooled vector, fp32
    m = re.search(r"\[bench\] cache: (\d+) notes, .* \[16 x 32\] \+ \[32\] fp32 per image", proc.stdout)
    assert m, proc.stdout[-3000:]
    assert result["cache_bytes"] == int(m.group(1)) * (16 * 32 + 32) * 4
