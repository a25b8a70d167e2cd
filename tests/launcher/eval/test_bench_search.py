"""A tiny run of benchmarks/bench_search.py, so that it cannot rot: every stage runs, the recalls
agree across the exact methods and the argsort, and the RESULT line carries the figures."""
import json
import subprocess
import sys

from tests.helpers.multirank import REPO


def test_bench_search_runs_small_and_reports_identical_recalls():
    out = subprocess.run([sys.executable, "benchmarks/bench_search.py", "--pool", "20000", "--queries", "300",
                          "--argsort-queries", "50", "--k", "20", "--faiss", "ivf", "--pool-chunk", "4096"],
                         capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT ")
    r = json.loads(last[len("RESULT "):])
    assert r["recalls_identical"] is True
    assert set(r["stages"]) == {"bound", "topk", "ranks", "legacy", "argsort", "faiss"}
    assert 0.0 < r["recall"]["20"] <= 1.0 and r["recall"]["1"] <= r["recall"]["10"] <= r["recall"]["20"]
    assert r["faiss"]["backend"] == "faiss-ivf" and 0.0 < r["faiss"]["recall_of_exact_topk"] <= 1.0
    for key in ("ratio", "argsort_extrapolated_over_topk", "peak_mb_over_chunk_budget"):
        assert r[key] > 0
