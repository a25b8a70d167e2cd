"""The training benchmarks run end to end in a lean setting, so that they cannot rot:
bench_train_step (its worker once called a name it never imported, and its driver one it dropped),
bench_chunked (its table and its ratios against the #14 targets) and bench_lora (on the tiny models).
Timings are not asserted."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers.paths import REPO, pretrained_model

pytestmark = pytest.mark.slow


def _run(script: str, *args: str) -> tuple[str, list]:
    pretrained_model("smollm2-135m")  # configs/demo_cpu.yaml's LLM
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", script), *args], capture_output=True,
                          text=True, timeout=900, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "terminate called" not in proc.stdout + proc.stderr
    results = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.stdout.strip().splitlines()[-1].startswith("RESULT ")
    return proc.stdout, results


def test_bench_train_step_lean_run_prints_both_results():
    out, results = _run("bench_train_step.py", "--steps", "2", "--warmup", "1", "--pairs", "2")
    assert [r["name"] for r in results] == ["train_step_data_wait_fraction", "model_state_per_rank_2_vs_1"]
    assert all(r["bound_or_baseline"] > 0 for r in results)
    assert "model state held per rank" in out


def test_bench_chunked_lean_run_prints_its_ratios_against_the_targets():
    out, results = _run("bench_chunked.py", "--pairs", "2", "4", "--chunk", "2", "--steps", "2", "--warmup", "1")
    (r,) = results
    assert r["name"] == "chunked_caching_memory_and_time" and r["target"] == "<= 1.3" and r["time_target"] == "<= 1.5"
    assert {(row["pairs"], row["chunk"]) for row in r["rows"]} == {(2, 0), (2, 2), (4, 0), (4, 2)}
    assert r["ratio"] == pytest.approx(r["figure"] / r["bound_or_baseline"], rel=1e-3)
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
