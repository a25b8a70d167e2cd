"""The repository root, computed in one place; every test that needs a path inside the repo imports it."""
from __future__ import annotations

import os

# tests/helpers/paths.py -> tests/helpers -> tests -> the repository root
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def repo_path(rel: str) -> str:
    """Absolute path of `rel` (slash-separated, relative to the repository root)."""
    return os.path.join(REPO, *rel.split("/"))


TINY_CPU = repo_path("configs/tiny_cpu.yaml")
