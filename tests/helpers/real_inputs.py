"""Overrides that turn configs/tiny_cpu.yaml into a runnable job: tiny Llama + tiny CLIP + synthetic
shards built by tests/helpers/real_setup.py (nothing downloaded)."""
from __future__ import annotations

import os

from tests.helpers.paths import TINY_CPU  # noqa: F401  (the config these overrides complete; importers use it)
from tests.helpers.real_setup import build_inputs


def tiny_cpu_overrides(root: str) -> list[str]:
    inputs = build_inputs(root)
    return [f"model.llm.path={inputs['llm']}", f"model.vision.path={inputs['clip']}",
            f"data.train_shards={inputs['train_shards']}"]


def cached_tiny_cpu_overrides(work: str) -> list[str]:
    """tiny_cpu_overrides built once per `work` folder and reused afterwards (scripts/soak.py,
    scripts/compare_scalars.py): a second run does not rebuild the models and shards."""
    import json
    import shutil

    done = os.path.join(work, "inputs.json")
    if os.path.exists(done):
        with open(done) as fh:
            return json.load(fh)
    shutil.rmtree(os.path.join(work, "inputs"), ignore_errors=True)
    overrides = tiny_cpu_overrides(os.path.join(work, "inputs"))
    with open(done, "w") as fh:
        json.dump(overrides, fh)
    return overrides
