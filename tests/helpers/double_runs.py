"""Shared helpers of the training-engine tests: the test double (tests/helpers/doubles.py) trained
through the real CLI under torchrun."""
from __future__ import annotations

from tests.helpers.paths import repo_path
from tests.helpers.multirank import run_command

DOUBLE = repo_path("tests/helpers/run_double.py")  # a script: torchrun runs it by path


def double_args(run_dir: str, *overrides: str) -> list[str]:
    return [DOUBLE, f"train.output_dir={run_dir}", "train.ds_config=ds_configs/cpu_zero3.json",
            "train.precision=fp32", "data.pairs_per_rank=4", "train.lr_new=0.01", "train.lr_llm=0.005",
            "train.warmup_steps=1", *overrides]


def train_double(run_dir: str, *overrides: str, nproc: int = 2, timeout: float = 240, env=None, check=True):
    return run_command(double_args(run_dir, *overrides), nproc=nproc, timeout=timeout, env=env, check=check)
