"""What training tells on the console (its evaluations, a final summary) and the learning rate it logs:
the rate each step used (it once logged the next step's, so warm-up never showed)."""
from __future__ import annotations

import re

import pytest

from notellm2.launcher.train.metrics import RunReport
from notellm2.launcher.train.optim import lr_lambda
from tests.helpers.double_runs import double_args
from tests.helpers.multirank import run_command
from tests.helpers.runs import metrics_by_step


def test_summary_gives_steps_time_last_and_best_and_the_bad_sample_log():
    report = RunReport(t0=0.0)
    for step, loss in ((2, 0.9), (4, 0.5), (6, 0.7)):
        report.evaluation(step, {"eval/val_loss": loss, "eval/recall@10": 1 - loss})
    assert report.eval_line(6) == "eval/recall@10 0.3000, eval/val_loss 0.7000"
    lines = report.summary(6, 6, 48, {"dropped/bad_image": 3, "dropped_total": 3, "batches": 6}, "/run/bad_samples")
    assert re.match(r"done: step 6 of 6 \(6 this run\) in [0-9:]+, 48 pairs seen", lines[0]), lines[0]
    # the headline is the first eval figure logged; "loss" in its name: lower is better
    assert lines[1] == "eval/val_loss: last 0.7000 (step 6), best 0.5000 (step 4; lower is better) over 3 evaluation(s)"
    assert lines[2] == "bad training samples (all ranks): dropped/bad_image 3; each one is listed in /run/bad_samples/"
    best_recall = RunReport("eval/recall@10", t0=0.0)
    best_recall.evaluations = report.evaluations
    assert "best 0.5000 (step 4; higher is better)" in best_recall.summary(6, 6, 48, {}, "x")[1]
    assert RunReport(t0=0.0).summary(1, 1, 8, {}, "x")[1].startswith("no evaluation ran")


@pytest.mark.slow
def test_logged_lr_is_the_one_each_step_used_and_the_console_reports_evaluations(tmp_path):
    """One real rank, warm-up over 3 of 5 steps: step s logs base * lambda(s - 1), the rate its optimizer
    step applied (LambdaLR advances after the step). The console prints each evaluation's figures and the
    summary with the last and best validation loss."""
    run = str(tmp_path / "run")
    args = double_args(run, "train.max_steps=5", "train.warmup_steps=3", "eval.every_steps=2",
                       "checkpoint.every_steps=100", "--components", "tests.helpers.doubles:components_with_val")
    res = run_command(args, nproc=1, timeout=300)
    got = metrics_by_step(run)
    f = lr_lambda("cosine", 3, 5, 0.0)  # the defaults: cosine to 0
    assert [got[s]["lr/new"] for s in range(1, 6)] == pytest.approx([0.01 * f(s - 1) for s in range(1, 6)])
    assert got[1]["lr/new"] == pytest.approx(0.01 / 3)  # warm-up shows from the first step
    evals = re.findall(r"step (\d+): evaluation: eval/val_loss ([0-9.]+)", res.output)
    assert [int(s) for s, _ in evals] == [2, 4]
    for step, value in evals:
        assert float(value) == pytest.approx(got[int(step)]["eval/val_loss"], abs=1e-4)
    best = min(evals, key=lambda sv: float(sv[1]))
    assert (f"eval/val_loss: last {evals[-1][1]} (step 4), best {best[1]} (step {best[0]}; lower is better) "
            f"over 2 evaluation(s)") in res.output
    assert re.search(r"done: step 5 of 5 \(5 this run\) in \d+:\d\d, 20 pairs seen", res.output), res.output[-3000:]
