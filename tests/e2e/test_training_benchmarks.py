"""The training benchmarks run end to end in a lean setting, so that they cannot rot:
bench_train_step (its worker once called a name it never imported, and its driver one it dropped),
bench_chunked (its table and its ratios against the #14 targets) and bench_lora (on the tiny models).
Timings are not asserted; each RESULT line must agree with itself (ratio = figure / baseline, pass =
the ratio against its target)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers.bench_results import check_result, result_lines
from tests.helpers.paths import REPO, pretrained_model

pytestmark = pytest.mark.slow


def _run(script: str, *args: str) -> tuple[str, list]:
    pretrained_model("smollm2-135m")  # configs/demo_cpu.yaml's LLM
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", script), *args], capture_output=True,
                          text=True, timeout=900, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "terminate called" not in proc.stdout + proc.stderr
    return proc.stdout, result_lines(proc.stdout)


def test_bench_train_step_lean_run_prints_both_results():
    out, results = _run("bench_train_step.py", "--steps", "2", "--warmup", "1", "--pairs", "2")
    assert [r["name"] for r in results] == ["train_step_data_wait_fraction", "model_state_per_rank_2_vs_1"]
    wait, state = results
    # the data wait's share of the step (seconds, 4 decimals) and 2 ranks' model state per rank against 1
    # rank's (bytes): each ratio its figure over its baseline, each pass its target
    assert (wait["target"], state["target"]) == ("<= 0.05", "<= 0.55")
    check_result(wait, "<=", 0.05, digits=4, ratio_digits=4)
    assert 0 <= wait["figure"] <= wait["bound_or_baseline"]  # a wait inside the step
    check_result(state, "<=", 0.55, digits=0, ratio_digits=4)
    # ZeRO-3 partitions the model states: each of 2 ranks holds about half of what 1 rank holds
    assert 0.45 <= state["ratio"] <= 0.55 and state["pass"] is True, state
    assert "model state held per rank" in out


def test_bench_chunked_lean_run_prints_its_ratios_against_the_targets():
    out, results = _run("bench_chunked.py", "--pairs", "2", "4", "--chunk", "2", "--steps", "2", "--warmup", "1")
    (r,) = results
    assert r["name"] == "chunked_caching_memory_and_time" and r["target"] == "<= 1.3" and r["time_target"] == "<= 1.5"
    by = {(row["pairs"], row["chunk"]): row for row in r["rows"]}
    assert set(by) == {(2, 0), (2, 2), (4, 0), (4, 2)}
    # the figure is P=4 chunked's activation memory, the baseline P=2 unchunked's; the time ratio the worse
    # of the two pair counts' chunked / unchunked step time per pair (from the rows as printed)
    assert (r["figure"], r["bound_or_baseline"]) == (by[(4, 2)]["activation_mb"], by[(2, 0)]["activation_mb"])
    worst = max(by[(p, 2)]["step_s_per_pair"] / by[(p, 0)]["step_s_per_pair"] for p in (2, 4))
    assert abs(r["time_per_pair_ratio"] - worst) <= 0.5e-4
    check_result(r, "<=", 1.3, digits=1, ratio_digits=4, also=r["time_per_pair_ratio"] <= 1.5)
    assert "activation memory at P=4 chunked vs P=2 unchunked" in out


def test_bench_lora_tiny_run_prints_its_ratios():
    """bench_lora on the tests' tiny models (the demo model's run is the benchmark's figure, docs/training.md)."""
    out, results = _run("bench_lora.py", "--tiny", "--steps", "2", "--warmup", "1", "--pairs", "2")
    (r,) = results
    assert r["name"] == "lora_model_state_per_rank_vs_full" and r["target"] == "<= 0.35" and r["model"] == "tiny"
    assert r["ratio"] == pytest.approx(r["figure"] / r["bound_or_baseline"], rel=1e-3)
    assert 0 < r["figure"] < r["bound_or_baseline"]  # LoRA holds less: no gradients nor Adam states of the LLM
    assert r["step_time_ratio"] == pytest.approx(r["step_time_s"] / r["full_step_time_s"], rel=1e-3)
    assert "LoRA rank 0:" in out and "full rank 1:" in out
