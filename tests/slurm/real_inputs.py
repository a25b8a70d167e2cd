"""Overrides that turn configs/tiny_cpu.yaml into a runnable job: tiny Llama + tiny CLIP + synthetic
shards built by tests/train/real_setup.py (nothing downloaded)."""
from __future__ import annotations

import os

from tests.multirank import REPO
from tests.train.real_setup import build_inputs

TINY_CPU = os.path.join(REPO, "configs", "tiny_cpu.yaml")


def tiny_cpu_overrides(root: str) -> list[str]:
    inputs = build_inputs(root)
    return [f"model.llm.path={inputs['llm']}", f"model.vision.path={inputs['clip']}",
            f"data.train_shards={inputs['train_shards']}"]
