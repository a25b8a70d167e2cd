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


RESUME_KEYS = ("loss/total", "loss/mm", "loss/vis", "optim/grad_norm", "model/gate_mean")


def kill_and_resume(config: str, run_dir: str, overrides: list, step: int = 3, rank: int = 1) -> None:
    """`notellm2 train --config config *overrides` on 2 ranks, `rank` SIGKILLed at the start of `step`
    (launcher/train/faults.py), then the same command again, which must resume from step - 1."""
    from notellm2.launcher.train import checkpoint as ckpt
    from tests.helpers.multirank import run_command

    cmd = ["-m", "notellm2.launcher", "train", "--config", config, *overrides]
    r = run_command(cmd, nproc=2, timeout=400, env={"NOTELLM2_TEST_DIE_AT": f"{rank}:{step}"}, check=False)
    assert r.returncode != 0
    assert ckpt.latest_complete(ckpt.checkpoint_root(run_dir)).endswith(ckpt.step_name(step - 1))
    r = run_command(cmd, nproc=2, timeout=400)
    assert f"resumed step {step - 1}" in r.output


def assert_same_steps(ref_dir: str, run_dir: str, steps: int, keys=RESUME_KEYS) -> None:
    """Both runs logged steps 1..steps with bit-identical `keys`, and the reference's losses moved."""
    ref, got = metrics_by_step(ref_dir), metrics_by_step(run_dir)
    assert sorted(got) == sorted(ref) == list(range(1, steps + 1))
    for s in ref:
        for key in keys:
            assert got[s][key] == ref[s][key], (s, key, got[s][key], ref[s][key])
    assert len({ref[s]["loss/total"] for s in ref}) == steps  # the losses moved
