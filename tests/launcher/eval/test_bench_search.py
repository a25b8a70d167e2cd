"""A tiny run of benchmarks/bench_search.py, so that it cannot rot: every stage runs, the recalls
agree across the exact methods and the argsort, and the RESULT line's figures agree with each other
(each ratio is the quotient of the stage times it names, the pass flag follows the targets)."""
import subprocess
import sys

from tests.helpers.bench_results import check_result, result_lines
from tests.helpers.multirank import REPO


def test_bench_search_runs_small_and_reports_identical_recalls():
    out = subprocess.run([sys.executable, "benchmarks/bench_search.py", "--pool", "20000", "--queries", "300",
                          "--argsort-queries", "50", "--k", "20", "--faiss", "ivf", "--pool-chunk", "4096"],
                         capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr
    (r,) = result_lines(out.stdout)
    assert r["recalls_identical"] is True
    stages = r["stages"]
    assert set(stages) == {"bound", "topk", "ranks", "legacy", "argsort", "faiss"}
    assert 0.0 < r["recall"]["20"] <= 1.0 and r["recall"]["1"] <= r["recall"]["10"] <= r["recall"]["20"]
    assert (r["pool"], r["queries"], r["target"], r["target_argsort"]) == (20000, 300, 1.5, 10.0)

    # the figure and bound are the topk and bound stages' CPU seconds; the other ratios their quotients
    assert (r["figure"], r["bound_or_baseline"]) == (stages["topk"]["seconds"], stages["bound"]["seconds"])
    assert abs(r["ranks_over_bound"] - stages["ranks"]["seconds"] / stages["bound"]["seconds"]) <= 0.5e-3 + 1e-9
    argsort = stages["argsort"]["extrapolated_seconds"] / stages["topk"]["seconds"]
    assert abs(r["argsort_extrapolated_over_topk"] - argsort) <= 0.01 * argsort + 0.01
    assert 0 < r["peak_mb_over_chunk_budget"]
    check_result(r, "<=", r["target"], digits=3, ratio_digits=3,
                 also=(r["argsort_extrapolated_over_topk"] >= r["target_argsort"] and r["recalls_identical"]
                       and r["peak_mb_over_chunk_budget"] <= 1.0))

    f = r["faiss"]
    assert f["backend"] == "faiss-ivf" and f["seconds"] == stages["faiss"]["seconds"]
    # the quotient of the two printed times, rounded to 3 decimals
    assert abs(f["speedup_vs_exact_topk"] - stages["topk"]["seconds"] / f["seconds"]) <= 0.5e-3 + 1e-9
    assert 0.0 < f["recall_of_exact_topk"] <= 1.0 and set(f["recall_loss"]) == set(r["recall"])
