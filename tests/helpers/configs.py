"""Tiny run configs: configs/tiny_cpu.yaml (the shipped smallest run) plus dotted overrides, loaded
and validated by notellm2.launcher.config.load_config, as `notellm2 train --config ... a.b=c` would.

    cfg = tiny_config({"train.max_steps": 4, "model.llm.path": llm})      # a RunConfig
    path = write_tiny_config(tmp / "run.yaml", {...})                     # the same, as a YAML file
    args = ["--config", TINY_CPU, *tiny_overrides({...})]                 # the same, for the CLI
"""
from __future__ import annotations

import json
import os

from tests.helpers.paths import TINY_CPU


def tiny_overrides(values: dict | None = None) -> list[str]:
    """{"train.max_steps": 4} -> ["train.max_steps=4"]. Values are written as JSON (a subset of YAML),
    so strings with braces or colons (shard patterns, paths) stay strings."""
    return [f"{key}={json.dumps(value)}" for key, value in (values or {}).items()]


def tiny_config(values: dict | None = None, *dotted: str, path: str = TINY_CPU):
    """configs/tiny_cpu.yaml with `values` ({"a.b": v}) and `dotted` ("a.b=v") applied, validated."""
    from notellm2.launcher.config import load_config

    return load_config(path, [*tiny_overrides(values), *dotted])


def write_tiny_config(out_path, values: dict | None = None, *dotted: str) -> str:
    """`tiny_config(values, *dotted)` written out resolved (every key) as a YAML file; returns its path."""
    import yaml

    from notellm2.launcher.config import config_to_dict

    cfg = tiny_config(values, *dotted)
    out_path = str(out_path)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as fh:
        yaml.safe_dump(config_to_dict(cfg), fh, sort_keys=False)
    return out_path
