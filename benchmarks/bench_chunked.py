"""Chunked representation caching (`train.chunk_pairs`): activation memory and step time per pair.

Model: configs/demo_cpu.yaml (SmolLM2-135M truncated to 4 layers, frozen EfficientNet-Lite0, Q-Former),
ZeRO-3 on 2 CPU ranks (ds_configs/cpu_zero3.json, fp32), synthetic 224 px shards written here. Each
configuration (P pairs per rank, with or without chunks of C pairs) is a fresh 2-rank run of the real
`notellm2.launcher.train.train.train` loop, so that no configuration inherits another's allocator state.

Figures per configuration:
  * activation memory per rank = peak RSS during the training steps minus the RSS right after the
    engine started (the peak is reset there through /proc/self/clear_refs, so the start-up's own peak
    does not count); the max over the 2 ranks;
  * step time per pair: median step time (steps after `--warmup`) / P.

Targets (issue #14): at the largest P with chunks, activation memory <= 1.3x that of the smallest P
without chunks; and the chunked step time per pair <= 1.5x the unchunked one at the same P.

    .venv/bin/python benchmarks/bench_chunked.py [--pairs 8 32 128 --chunk 8 --steps 3 --warmup 1]

Needs artifacts/models/smollm2-135m (scripts/prepare_models.py) and the efficientnet packages.
Ends with one `RESULT {json}` line.
"""
from __future__ import annotations

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
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
from bench_train_step import demo_config_or_exit, driver_parser, make_shards  # noqa: E402  (shared driver parts)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


# ----------------------------------------------------------------------------- worker (one rank)

def worker(args) -> None:
    import torch.distributed as dist

    import notellm2.launcher.train.train as train_module
    from notellm2.launcher.config import load_config
    from notellm2.launcher.distributed import shutdown

    cfg = load_config(args.config, json.loads(args.overrides))
    base = {}
    initialize = train_module.initialize

    def initialize_and_mark(*a, **kw):  # the RSS right after the engine started; the peak restarts there
        out = initialize(*a, **kw)
        base["rss_kb"] = _status_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return out

    train_module.initialize = initialize_and_mark
    steps = []

    def on_step(step, info):
        steps.append(info["scalars"]["perf/step_time_s"])

    train_module.train(cfg, on_step=on_step)
    mine = {"base_kb": base["rss_kb"], "peak_kb": _status_kb("VmHWM"), "steps": steps}
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    if dist.get_rank() == 0:
        with open(args.result, "w") as fh:
            json.dump(ranks, fh)
    shutdown()  # the rank's one teardown before the interpreter exits (launcher/distributed.py says why)


# ----------------------------------------------------------------------------- driver

def run(pairs: int, chunk: int, args, shards: str, work: str) -> dict:
    tag = f"p{pairs}-c{chunk}"
    result = os.path.join(work, f"result-{tag}.json")
    overrides = [f"data.train_shards={shards}", "data.val_shards=", "data.notes_shards=",
                 f"train.output_dir={os.path.join(work, tag)}",
                 f"train.max_steps={args.steps}", "checkpoint.every_steps=100000", "checkpoint.resume=none",
                 "train.warmup_steps=1", "logging.tensorboard=false", f"data.pairs_per_rank={pairs}",
                 f"train.chunk_pairs={chunk}", "eval.every_steps=0"]
    cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", "--nproc-per-node", "2",
           os.path.abspath(__file__), "--worker", "--config", args.config, "--overrides", json.dumps(overrides),
           "--result", result]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, HF_HUB_OFFLINE="1")
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{tag} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    with open(result) as fh:
        ranks = json.load(fh)
    measured = [statistics.median(r["steps"][args.warmup:] or r["steps"][-1:]) for r in ranks]
    act_mb = max(r["peak_kb"] - r["base_kb"] for r in ranks) / 1024
    row = {"pairs": pairs, "chunk": chunk, "activation_mb": round(act_mb, 1), "step_s": round(max(measured), 3),
           "step_s_per_pair": round(max(measured) / pairs, 4), "wall_s": round(time.monotonic() - t0, 1),
           "steps_measured": len(ranks[0]["steps"][args.warmup:]) or 1}
    print(f"[bench] P={pairs:<4} chunk={chunk or '-':<3} activation {act_mb:8.1f} MB/rank (max of 2), "
          f"step {row['step_s']:7.2f} s = {row['step_s_per_pair']:.3f} s/pair ({row['wall_s']:.0f} s wall)", flush=True)
    return row


def main() -> int:
    p = driver_parser(__doc__)
    p.add_argument("--pairs", type=int, nargs="+", default=[8, 32, 128], help="pairs per rank")
    p.add_argument("--chunk", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--skip", nargs="*", default=[], help="configurations to leave out, as P:C (C 0: unchunked)")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0

    demo_config_or_exit(args.config)
    work = tempfile.mkdtemp(prefix="bench-chunked-")
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # its shards and runs: gigabytes a run
    shards = make_shards(os.path.join(work, "data"), n_pairs=max(256, 2 * max(args.pairs) * args.steps), shard_size=64)
    rows = []
    for pairs in sorted(args.pairs):
        for chunk in (0, args.chunk):
            if f"{pairs}:{chunk}" in args.skip or (chunk and pairs % chunk):
                continue
            rows.append(run(pairs, chunk, args, shards, work))
    by = {(r["pairs"], r["chunk"]): r for r in rows}
    print("\n| pairs/rank | chunks | activation MB/rank | step s | s/pair |\n|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['pairs']} | {r['chunk'] or 'off'} | {r['activation_mb']:.0f} | {r['step_s']:.2f} | {r['step_s_per_pair']:.3f} |")
    small, large = min(args.pairs), max(args.pairs)
    base = by.get((small, 0))
    big = by.get((large, args.chunk))
    mem_ratio = big["activation_mb"] / base["activation_mb"] if base and big else None
    time_ratios = {p_: by[(p_, args.chunk)]["step_s_per_pair"] / by[(p_, 0)]["step_s_per_pair"]
                   for p_ in args.pairs if (p_, 0) in by and (p_, args.chunk) in by}
    worst_time = max(time_ratios.values()) if time_ratios else None
    print(f"activation memory at P={large} chunked vs P={small} unchunked: "
          f"{mem_ratio if mem_ratio is None else round(mem_ratio, 3)} (target <= 1.3); "
          f"chunked / unchunked step time per pair: { {k: round(v, 3) for k, v in time_ratios.items()} } (target <= 1.5)")
    result = {"name": "chunked_caching_memory_and_time", "figure": big["activation_mb"] if big else None,
              "bound_or_baseline": base["activation_mb"] if base else None,
              "ratio": None if mem_ratio is None else round(mem_ratio, 4), "target": "<= 1.3",
              "time_per_pair_ratio": None if worst_time is None else round(worst_time, 4), "time_target": "<= 1.5",
              "pass": bool(mem_ratio is not None and mem_ratio <= 1.3 and worst_time is not None and worst_time <= 1.5),
              "pairs": sorted(args.pairs), "chunk": args.chunk, "steps": args.steps, "warmup": args.warmup,
              "rows": rows}
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
