"""Training step breakdown and per-rank model-state memory of the demo-sized model on CPU ranks.

Model: configs/demo_cpu.yaml (SmolLM2-135M truncated to 4 layers, frozen EfficientNet-Lite0, Q-Former),
ZeRO-3 on CPU (ds_configs/cpu_zero3.json, bf16), on synthetic 224 px shards written here
(catalog -> pairs -> WebDataset shards). Two runs of the real `notellm2.launcher.train.train.train` loop under
torchrun: 2 ranks and 1 rank, same pairs per rank.

Figures (2-rank run, steps after `--warmup`, medians):
  * step time split into data wait, forward (frozen tower + model), backward, optimizer step; and
    the communication time inside them: every torch.distributed collective, timed to completion.
  * data wait as a fraction of step time; target <= 0.05.
  * model state actually held per rank (parameter partitions + fp32 master partitions + gradient
    partitions + Adam states, read from the DeepSpeed engine) at 2 ranks vs 1 rank; target <= 0.55.

    .venv/bin/python benchmarks/bench_train_step.py [--steps 8 --warmup 2 --config configs/demo_cpu.yaml]

Needs artifacts/models/smollm2-135m (scripts/prepare_models.py) and the efficientnet packages.
Ends with `RESULT {json}` lines (one per target).
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

COLLECTIVES = ("all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce", "broadcast", "all_gather",
               "reduce_scatter", "all_to_all_single", "_all_gather_base", "_reduce_scatter_base")


# ----------------------------------------------------------------------------- worker (one rank)

def _time_collectives(acc: dict) -> None:
    """Wrap torch.distributed collectives: each call is completed (waited on) inside the timer."""
    import torch.distributed as dist

    for name in COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is None:
            continue

        def wrapped(*args, __fn=fn, **kwargs):
            t0 = time.perf_counter()
            work = __fn(*args, **kwargs)
            if work is not None and hasattr(work, "wait"):
                work.wait()
            acc["comm"] += time.perf_counter() - t0
            return work

        setattr(dist, name, wrapped)


def worker(args) -> None:
    import torch.distributed as dist

    from notellm2.launcher.config import load_config
    from notellm2.launcher.distributed import shutdown
    from notellm2.launcher.plan import model_state_bytes
    from notellm2.launcher.train.train import train

    acc = {"comm": 0.0}
    _time_collectives(acc)
    cfg = load_config(args.config, json.loads(args.overrides))
    steps = []
    last = {"comm": 0.0}

    def on_step(step, info):
        t = dict(info["timings"])
        t["comm"] = acc["comm"] - last["comm"]
        last["comm"] = acc["comm"]
        t["step"] = info["scalars"]["perf/step_time_s"]
        steps.append(t)
        if step == cfg.train.max_steps:
            info_state = model_state_bytes(info["engine"])
            states = [None] * dist.get_world_size()
            dist.all_gather_object(states, info_state)
            steps.append({"model_state": states})

    train(cfg, on_step=on_step)
    if dist.get_rank() == 0:
        with open(args.result, "w") as fh:
            json.dump(steps, fh)
    shutdown()  # the rank's one teardown before the interpreter exits (launcher/distributed.py says why)


# ----------------------------------------------------------------------------- driver

def make_shards(root: str, n_pairs: int, shard_size: int = 32) -> str:
    """Synthetic train pair shards (256 px images) for the training benchmarks; their pattern."""
    from tests.helpers.data import synthetic_shards

    shard_dir, manifest = synthetic_shards(root, n_notes=max(64, n_pairs // 2), n_categories=8, n_pairs=n_pairs,
                                           shard_size=shard_size, image_size=256, splits=("train",))
    return os.path.join(shard_dir, manifest["patterns"]["pairs-train"])


def run(nproc: int, args, shards: str, work: str, extra: tuple = (), tag: str = "") -> list:
    """One torchrun of this file's worker; `extra`: more config overrides, `tag`: names its run (several runs
    in one `work`)."""
    result = os.path.join(work, f"result-{nproc}{tag}.json")
    overrides = [f"data.train_shards={shards}", "data.val_shards=", "data.notes_shards=",
                 f"train.output_dir={os.path.join(work, f'run-{nproc}{tag}')}",
                 f"train.max_steps={args.steps}", "checkpoint.every_steps=100000", "checkpoint.resume=none",
                 "train.warmup_steps=1", "logging.tensorboard=false", f"data.pairs_per_rank={args.pairs}", *extra]
    cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", "--nproc-per-node", str(nproc),
           os.path.abspath(__file__), "--worker", "--config", args.config, "--overrides", json.dumps(overrides),
           "--result", result]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, 2 // nproc)), PYTHONPATH=REPO, HF_HUB_OFFLINE="1")
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{nproc}-rank run failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    print(f"[bench] {nproc}-rank run{tag}: {time.monotonic() - t0:.0f}s wall")
    with open(result) as fh:
        return json.load(fh)


def median(rows: list, key: str) -> float:
    return statistics.median(r.get(key, 0.0) for r in rows)


def driver_parser(doc: str) -> argparse.ArgumentParser:
    """The options every training benchmark has: the hidden worker-mode ones and --config."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--overrides", default="[]", help=argparse.SUPPRESS)
    p.add_argument("--result", default="", help=argparse.SUPPRESS)
    p.add_argument("--config", default=os.path.join(REPO, "configs", "demo_cpu.yaml"))
    return p


def demo_config_or_exit(path: str):
    """The benchmark's run config, its LLM checked to be there (scripts/prepare_models.py)."""
    from notellm2.launcher.config import load_config

    cfg = load_config(path)
    llm = cfg.model.llm.path if os.path.isabs(cfg.model.llm.path) else os.path.join(REPO, cfg.model.llm.path)
    if not os.path.isfile(os.path.join(llm, "config.json")):
        sys.exit(f"{path}: model.llm.path {cfg.model.llm.path} is missing; run scripts/prepare_models.py first")
    return cfg


def main() -> int:
    p = driver_parser(__doc__)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--pairs", type=int, default=8, help="pairs per rank")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0

    cfg = demo_config_or_exit(args.config)
    work = tempfile.mkdtemp(prefix="bench-train-")
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # its shards and runs: gigabytes a run
    shards = make_shards(os.path.join(work, "data"), n_pairs=max(256, 2 * args.pairs * args.steps * 2))
    two = run(2, args, shards, work)
    one = run(1, args, shards, work)

    steps2 = [r for r in two if "step" in r][args.warmup:]
    mem2 = [r for r in two if "model_state" in r][0]["model_state"]
    mem1 = [r for r in one if "model_state" in r][0]["model_state"]
    step = median(steps2, "step")
    print(f"2 ranks x {args.pairs} pairs, {cfg.train.precision}, {len(steps2)} measured steps (median seconds):")
    for key in ("data_wait", "forward", "backward", "optimizer", "comm"):
        note = "  (inside forward/backward/optimizer)" if key == "comm" else ""
        print(f"  {key:<10} {median(steps2, key):7.3f} s  {median(steps2, key) / step:6.1%} of step{note}")
    print(f"  {'step':<10} {step:7.3f} s")
    wait_frac = median(steps2, "data_wait") / step
    per_rank2 = statistics.mean(m["total"] for m in mem2)
    per_rank1 = mem1[0]["total"]
    mib = 2 ** 20
    print("model state held per rank (MiB): params / fp32 master / grads / optimizer = total")
    for label, states in (("1 rank", mem1), ("2 ranks", mem2)):
        for r, m in enumerate(states):
            print(f"  {label} rank {r}: {m['params'] / mib:.1f} / {m['master'] / mib:.1f} / {m['grads'] / mib:.1f} / "
                  f"{m['optimizer'] / mib:.1f} = {m['total'] / mib:.1f}")
    mem_ratio = per_rank2 / per_rank1
    print(f"data wait fraction {wait_frac:.3f} (target <= 0.05); memory ratio 2 vs 1 rank {mem_ratio:.3f} (target <= 0.55)")
    results = [
        {"name": "train_step_data_wait_fraction", "figure": round(median(steps2, "data_wait"), 4),
         "bound_or_baseline": round(step, 4), "ratio": round(wait_frac, 4), "target": "<= 0.05",
         "pass": wait_frac <= 0.05},
        {"name": "model_state_per_rank_2_vs_1", "figure": int(per_rank2), "bound_or_baseline": int(per_rank1),
         "ratio": round(mem_ratio, 4), "target": "<= 0.55", "pass": mem_ratio <= 0.55},
    ]
    for res in results:
        print("RESULT " + json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
