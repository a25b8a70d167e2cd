"""A tiny run of benchmarks/bench_new_notes.py, so that it cannot rot: every stage runs (exact and faiss build,
update and rebuild; the update on 2 ranks), the exact tables agree and the RESULT line carries the figures."""
import json
import subprocess
import sys

import pytest

from tests.helpers.multirank import REPO


@pytest.mark.slow
def test_bench_new_notes_runs_small_and_the_exact_tables_agree():
    out = subprocess.run([sys.executable, "benchmarks/bench_new_notes.py", "--pool", "4000", "--new", "60",
                          "--changed", "10", "--deleted", "10", "--k", "5", "--reserve", "2", "--ranks", "2",
                          "--faiss", "faiss-ivf"], capture_output=True, text=True, cwd=REPO, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT ")
    r = json.loads(last[len("RESULT "):])
    assert r["identical"] is True and r["notes_differing"] == 0
    assert set(r["stages"]) == {"build", "update", "rebuild"} and r["ratio"] > 0 and r["target"] == 0.05
    assert r["startup"]["cpu_s"] > 0 and r["ratio_net_of_startup"] >= 0
    assert r["counts"]["added"] == 60 and r["counts"]["changed"] == 10 and r["counts"]["removed"] == 10
    assert r["index_bytes_per_note"] == 256.0  # 64 float32 per note: the exact index is the vectors
    f = r["faiss"]
    assert f["backend"] == "faiss-ivf" and 0.5 < f["overlap_updated_vs_exact"] <= 1.0 and f["index_mb"] > 0
    assert r["ranks"]["2"]["identical_to_one_process"] is True and r["ranks"]["2"]["wall_s"] > 0
