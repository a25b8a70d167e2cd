"""A run's `metrics.jsonl` (rank 0 writes one JSON line per step; launcher/train/metrics.py), parsed here only."""
from __future__ import annotations

import json
import os


def read_metrics(run_dir: str, missing_ok: bool = False) -> list[dict]:
    """Every record of `run_dir`/metrics.jsonl, in file order (blank lines skipped).

    A line that is not JSON fails with the file and line number: the writer drops lines cut by a
    kill when it resumes, so a finished run has none. A missing file is an error unless
    `missing_ok` (then: no records)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        if missing_ok:
            return []
        raise FileNotFoundError(f"{path}: no metrics.jsonl (the run wrote no step)")
    records = []
    with open(path) as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not a JSON line ({e}): {line[:80]!r}") from None
    return records


def metrics_by_step(run_dir: str, missing_ok: bool = False) -> dict:
    """step -> record; a step logged twice fails (a resumed run must forget the steps it runs again)."""
    out: dict = {}
    for rec in read_metrics(run_dir, missing_ok):
        step = rec["step"]
        if step in out:
            raise ValueError(f"{os.path.join(run_dir, 'metrics.jsonl')}: step {step} is logged twice")
        out[step] = rec
    return out


def logged_steps(run_dir: str, missing_ok: bool = False) -> list[int]:
    """The steps of metrics.jsonl in file order (duplicates kept, so a test can see them)."""
    return [rec["step"] for rec in read_metrics(run_dir, missing_ok)]
