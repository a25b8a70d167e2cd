"""Training metrics: TensorBoard scalars, a per-step JSONL, and the console progress line.

Only rank 0 writes. Scalar names (see docs/training.md):
  loss/total, loss/mm, loss/vis            total loss and the mICL parts
  lr/<group>                               learning rate per optimizer group
  model/logit_scale                        contrastive temperature (as a scale)
  model/gate_mean, model/gate_std          late-fusion gate mean and spread
  optim/grad_norm                          global gradient norm before clipping
  perf/samples_per_s, perf/tokens_per_s    notes per second and non-pad tokens per second (all ranks)
  perf/data_wait_frac                      share of the step spent waiting for the data loader
  perf/step_time_s
  memory/rank<r>_mb                        RSS on CPU, CUDA max allocated on GPU, per rank
  data/<counter>                           loader counters (bad samples, ...), summed over ranks
  eval/<metric>                            evaluation metrics when present
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Optional

import psutil
import torch


def memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return psutil.Process().memory_info().rss / 2**20


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


class MetricsWriter:
    """Rank 0 writes `metrics.jsonl` (one line per step, appended on resume) and TensorBoard events."""

    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool = True, max_steps: int = 0,
                 start_step: int = 0, stream=None):
        self.enabled = enabled
        self.max_steps = max_steps
        self.stream = stream or sys.stdout
        self._t0 = time.monotonic()
        self._start_step = start_step
        self._tb = None
        self._jsonl = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, "metrics.jsonl")
        self._drop_steps_after(path, start_step)
        self._jsonl = open(path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=os.path.join(run_dir, "tensorboard"), purge_step=start_step + 1)

    @staticmethod
    def _drop_steps_after(path: str, step: int) -> None:
        """On resume, forget lines of steps that the restored checkpoint never saw (a run killed after
        its last checkpoint logged steps that will now be run again)."""
        if not os.path.exists(path):
            return
        keep = []
        with open(path) as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if rec.get("step", 0) <= step:
                    keep.append(json.dumps(rec))
        tmp = path + ".tmp"
        with open(tmp, "w") as fh:
            fh.write("".join(k + "\n" for k in keep))
        os.replace(tmp, path)

    def log(self, step: int, scalars: dict, extra: Optional[dict] = None) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **{k: float(v) for k, v in scalars.items()}}
        if extra:
            record.update(extra)
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, float(value), step)

    def progress(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        done = step - self._start_step
        elapsed = time.monotonic() - self._t0
        rate = elapsed / done if done > 0 else float("nan")
        eta = rate * (self.max_steps - step) if done > 0 else float("nan")
        pct = 100.0 * step / max(1, self.max_steps)
        line = (f"step {step}/{self.max_steps} ({pct:.0f}%) loss {scalars.get('loss/total', float('nan')):.4f} "
                f"lr {scalars.get('lr/new', scalars.get('lr/llm', 0.0)):.2e} "
                f"{scalars.get('perf/samples_per_s', 0.0):.1f} notes/s "
                f"wait {100 * scalars.get('perf/data_wait_frac', 0.0):.0f}% "
                f"elapsed {_fmt_duration(elapsed)} eta {_fmt_duration(eta)}")
        print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None
