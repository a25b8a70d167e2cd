"""Shared helpers of the training-engine tests."""
from __future__ import annotations

import json
import os

from tests.multirank import REPO, run_command

DOUBLE = os.path.join(REPO, "tests", "train", "run_double.py")


def double_args(run_dir: str, *overrides: str) -> list[str]:
    return [DOUBLE, f"train.output_dir={run_dir}", "train.ds_config=ds_configs/cpu_zero3.json",
            "train.precision=fp32", "data.pairs_per_rank=4", "train.lr_new=0.01", "train.lr_llm=0.005",
            "train.warmup_steps=1", *overrides]


def train_double(run_dir: str, *overrides: str, nproc: int = 2, timeout: float = 240, env=None, check=True):
    return run_command(double_args(run_dir, *overrides), nproc=nproc, timeout=timeout, env=env, check=check)


def read_metrics(run_dir: str) -> dict:
    """step -> record of rank 0's metrics.jsonl."""
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        for line in fh:
            rec = json.loads(line)
            out[rec["step"]] = rec
    return out
