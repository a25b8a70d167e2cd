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

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import psutil
import torch

from notellm2.launcher.distributed import all_gather_object, all_reduce
from notellm2.files import atomic_write_text


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
        atomic_write_text(path, "".join(k + "\n" for k in keep))

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


# ----------------------------------------------------------------------------- one step's figures

class Timer:
    """Seconds per phase within a step: `with timer("forward"): ...`, then `pop()` the totals."""

    def __init__(self):
        self.totals: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t0

    def pop(self) -> dict:
        out, self.totals = self.totals, {}
        return out


def count_tokens(batch: dict) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if torch.is_tensor(mask) else 0


LOSS_PARTS = ("loss", "loss_mm", "loss_vis")
MODEL_EXTRAS = ("logit_scale", "gate_mean", "gate_std")


@dataclass
class StepStats:
    """One step's figures on this rank. The float fields differ per rank and are summed over ranks in
    ONE all-reduce (`all_reduced()`: packed into one float64 tensor by field name, unpacked the same
    way); the fields marked `local` stay this rank's own."""

    loss: float = 0.0  # mean over the accumulation steps (each micro batch's loss / accum)
    loss_mm: float = 0.0
    loss_vis: float = 0.0
    tokens: float = 0.0  # non-pad tokens
    notes: float = 0.0
    data_wait_s: float = 0.0
    step_time_s: float = 0.0
    stop_asked: float = 0.0  # 1.0 when this rank got a stop signal (preemption)
    seen_parts: set = field(default_factory=set, metadata={"local": True})  # loss parts the model returned
    extras: dict = field(default_factory=dict, metadata={"local": True})  # model figures of the last micro batch

    @classmethod
    def reduced_fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if not f.metadata.get("local")]

    def add_batch(self, batch: dict) -> None:
        self.tokens += count_tokens(batch)
        self.notes += int(batch["note_ids"].shape[0]) if "note_ids" in batch else 0

    def add_outputs(self, out: dict, accum: int) -> None:
        for key in LOSS_PARTS:
            if out.get(key) is not None:
                setattr(self, key, getattr(self, key) + float(out[key].detach().float()) / accum)
                self.seen_parts.add(key)
        for key in MODEL_EXTRAS:
            if out.get(key) is not None:
                self.extras[key] = float(torch.as_tensor(out[key]).detach().float().mean())

    def pack(self) -> torch.Tensor:
        return torch.tensor([getattr(self, name) for name in self.reduced_fields()], dtype=torch.float64)

    def unpack(self, packed: torch.Tensor) -> "StepStats":
        """A copy with the reduced fields read back from `packed` (local fields kept)."""
        return dataclasses.replace(self, **{name: packed[i].item() for i, name in enumerate(self.reduced_fields())})

    def all_reduced(self) -> "StepStats":
        """Collective: the sums over ranks (one all-reduce)."""
        packed = self.pack()
        all_reduce(packed)
        return self.unpack(packed)


def flatten_counters(stats: dict) -> dict:
    """Loader stats {"dropped": {"bad_image": 2}, "batches": 8} -> {"dropped/bad_image": 2,
    "dropped_total": 2, "batches": 8}: numbers only, nested groups also summed."""
    out = {}
    for key, value in (stats or {}).items():
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[key] = value
        elif isinstance(value, dict):
            nums = {k: v for k, v in value.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            for k, v in nums.items():
                out[f"{key}/{k}"] = v
            out[f"{key}_total"] = sum(nums.values())
    return out


def gather_counters(loader) -> dict:
    """Collective when the loader has `stats()`: its counters summed over ranks."""
    counters = {}
    if hasattr(loader, "stats"):
        st = loader.stats() or {}
        for s in all_gather_object(flatten_counters(st)):
            for k, v in (s or {}).items():
                counters[k] = counters.get(k, 0) + v
    return counters


def step_scalars(local: StepStats, summed: StepStats, world: int, group_names: list, lrs: list,
                 grad_norm, memory: list, counters: dict) -> dict:
    """The scalars of one step (names in the module docstring), from this rank's figures and their sums."""
    scalars = {"loss/total": summed.loss / world}
    if "loss_mm" in local.seen_parts:
        scalars["loss/mm"] = summed.loss_mm / world
    if "loss_vis" in local.seen_parts:
        scalars["loss/vis"] = summed.loss_vis / world
    for name, lr in zip(group_names, lrs):
        scalars[f"lr/{name}"] = lr
    for part in ("llm", "new"):
        found = [lr for name, lr in zip(group_names, lrs) if name.startswith(part)]
        if found:
            scalars[f"lr/{part}"] = found[0]
    for key in MODEL_EXTRAS:
        if key in local.extras:
            scalars[f"model/{key}"] = local.extras[key]
    if grad_norm is not None:
        scalars["optim/grad_norm"] = float(grad_norm)
    scalars["perf/step_time_s"] = local.step_time_s
    scalars["perf/samples_per_s"] = summed.notes / max(local.step_time_s, 1e-9)
    scalars["perf/tokens_per_s"] = summed.tokens / max(local.step_time_s, 1e-9)
    scalars["perf/data_wait_frac"] = summed.data_wait_s / max(summed.step_time_s, 1e-9)
    for r, m in enumerate(memory):
        scalars[f"memory/rank{r}_mb"] = m
    for k, v in counters.items():
        scalars[f"data/{k}"] = v
    return scalars


# ----------------------------------------------------------------------------- the console's report

class RunReport:
    """What the console tells about a run: each evaluation's figures as one line, and a final summary
    (steps, time, the headline metric's last and best values, the samples the data path could not use
    and where they are listed). The headline metric is checkpoint.keep_best when set, else eval/loss,
    else the first eval/ figure; "loss" in its name means lower is better (as checkpoint.keep_best)."""

    def __init__(self, best_metric: Optional[str] = None, t0: Optional[float] = None, start_step: int = 0):
        self.best_metric = best_metric or None
        self.t0 = time.monotonic() if t0 is None else t0
        self.start_step = start_step
        self.evaluations: list[tuple[int, dict]] = []

    def evaluation(self, step: int, figures: dict) -> None:
        self.evaluations.append((step, {k: float(v) for k, v in figures.items()}))

    def eval_line(self, step: int) -> str:
        figures = dict(self.evaluations[-1][1]) if self.evaluations else {}
        return ", ".join(f"{k} {v:.4f}" for k, v in sorted(figures.items())) or "no figures"

    def headline(self) -> Optional[str]:
        if self.best_metric:
            return self.best_metric
        keys = [k for _, f in self.evaluations for k in f]
        return "eval/loss" if "eval/loss" in keys else (keys[0] if keys else None)

    def summary(self, step: int, max_steps: int, samples_seen: int, counters: dict, bad_sample_dir: str) -> list[str]:
        elapsed = time.monotonic() - self.t0
        lines = [f"done: step {step} of {max_steps} ({step - self.start_step} this run) in {_fmt_duration(elapsed)}, "
                 f"{samples_seen} pairs seen"]
        key = self.headline()
        seen = [(s, f[key]) for s, f in self.evaluations if key is not None and key in f]
        if seen:
            lower = "loss" in key
            best = (min if lower else max)(seen, key=lambda sv: sv[1])
            lines.append(f"{key}: last {seen[-1][1]:.4f} (step {seen[-1][0]}), best {best[1]:.4f} (step {best[0]}; "
                         f"{'lower' if lower else 'higher'} is better) over {len(seen)} evaluation(s)")
        else:
            lines.append("no evaluation ran (eval.every_steps is 0 or larger than the steps run)")
        bad = {k: v for k, v in (counters or {}).items()
               if k.split("/")[0] in ("dropped", "blanked") and "/" in k and v}
        if bad or counters.get("shard_problems"):
            shown = ", ".join(f"{k} {int(v)}" for k, v in sorted(bad.items()))
            if counters.get("shard_problems"):
                shown += (", " if shown else "") + f"damaged shards {int(counters['shard_problems'])}"
            lines.append(f"bad training samples (all ranks): {shown}; each one is listed in {bad_sample_dir}/")
        return lines
