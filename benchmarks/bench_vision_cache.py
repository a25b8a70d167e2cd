"""What the frozen-tower feature cache (data.vision_cache) saves per training step.

Model: configs/demo_cpu.yaml (SmolLM2-135M truncated to 4 layers, frozen EfficientNet-Lite0 at 224 px,
Q-Former), ZeRO-3 on CPU ranks, on synthetic 256 px shards written here. The cache is written first
(`notellm2.launcher.train.vision_cache`, the library of `notellm2 data cache-vision`); then ONE training run of the
real loop (`notellm2.launcher.train.train.train`) takes its batches alternately from two PairLoaders over the same
shards and plan, one on pixels and one on the cache (batch k is the same pairs either way, so the run
trains exactly as a plain run), and so measures, under the same load of the machine, step for step:

  (a) the step time of the pixel steps (the loader decodes images, the tower runs);
  (b) the step time of the cached steps (the tower does not run);
  (c) the tower's forward time per pixel step: every `encode_images` call of the step, timed to
      completion (CUDA synchronised), mean over ranks.

The figure is the fraction of the tower's time the cache removes, ((a) - (b)) / (c) (medians over the
measured steps), against the target 0.8. Both loaders' workers run throughout, so the decoding of the
pixel loader costs the cached steps too (on a small machine it competes for the cores): the figure
is the tower's share, not the decoder's. Also printed: the data waits and the one-time cost of writing
the cache, and the steps after which it has paid for itself; the RESULT line also counts the tower's
forwards on each kind of step over the whole run (all ranks): none on the cached ones.

    .venv/bin/python benchmarks/bench_vision_cache.py [--steps 12 --warmup 2 --ranks 2 --pairs 8]
    .venv/bin/python benchmarks/bench_vision_cache.py --llm /path/to/smollm2-135m   # models elsewhere
    .venv/bin/python benchmarks/bench_vision_cache.py --tiny                        # tiny models, seconds

Needs artifacts/models/smollm2-135m (scripts/prepare_models.py) and the efficientnet packages, or
--tiny (the tests' tiny Llama and CLIP, built here). Ends with one line `RESULT {json}`.
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


# ----------------------------------------------------------------------------- worker (one rank)

class Alternating:
    """Batch k from the pixel loader when k is even, from the cached loader when k is odd; both advance
    in lockstep (the other's batch k is dropped), so the batches are a plain run's. `kinds` records the
    source of each batch yielded."""

    def __init__(self, pixels, cached):
        self.pixels, self.cached, self.kinds = pixels, cached, []

    def endless(self):
        for k, (a, b) in enumerate(zip(self.pixels.endless(), self.cached.endless())):
            self.kinds.append("pixels" if k % 2 == 0 else "cached")
            yield a if k % 2 == 0 else b

    def state_dict(self):
        return self.pixels.state_dict()

    def load_state_dict(self, state):
        self.pixels.load_state_dict(state)
        self.cached.load_state_dict(state)

    def stats(self):
        return self.pixels.stats()


def bench_components(cfg, rank, world_size, ds_config):
    """default_components (data.vision_cache set: the cached loader), plus a pixel loader of the same
    plan, alternated; the tower stays on the training device (the pixel steps run it), and its call is
    timed: `comps.tower_s` collects the seconds of each call."""
    import dataclasses

    import torch

    from notellm2.data_shards.reader import PairLoader
    from notellm2.launcher.train.components import default_components

    comps = default_components(cfg, rank, world_size, ds_config)
    comps.extra["vision_cache"] = None  # keep the tower on the device: the pixel steps need it
    pixel_cfg = dataclasses.replace(cfg.data, vision_cache=None)
    cached_loader = comps.make_loader

    def make_loader(epoch):
        pixels = PairLoader(cfg.data.train_shards, None, data_cfg=pixel_cfg, encode_fn=comps.prompter.encode,
                            collate_text_fn=comps.prompter.collate, rank=rank, world_size=world_size,
                            pairs_per_rank=cfg.data.pairs_per_rank, image_size=cfg.model.vision.image_size, epoch=epoch)
        comps.alternating = Alternating(pixels, cached_loader(epoch))
        return comps.alternating

    comps.make_loader = make_loader
    inner = comps.image_features
    comps.tower_s = []

    def image_features(batch, cast=None):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = inner(batch, cast)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        comps.tower_s.append(time.perf_counter() - t0)
        return out

    comps.image_features = image_features
    comps.tower_forwards = 0  # forwards the tower really ran (none on a cached step), for the RESULT line

    def count_forward(*_):
        comps.tower_forwards += 1

    if comps.vision_tower is not None:
        comps.vision_tower.register_forward_pre_hook(count_forward)
    return comps


def worker(args) -> None:
    import torch.distributed as dist

    from notellm2.launcher.config import load_config
    from notellm2.launcher.distributed import shutdown
    from notellm2.launcher.train.train import train

    cfg = load_config(args.config, json.loads(args.overrides))
    built = {}

    def factory(*a):
        built["comps"] = bench_components(*a)
        return built["comps"]

    steps = []

    def on_step(step, info):
        comps = built["comps"]
        tower = sum(comps.tower_s)
        comps.tower_s.clear()
        steps.append({"kind": comps.alternating.kinds[step - 1], "step": info["scalars"]["perf/step_time_s"],
                      "data_wait": info["timings"].get("data_wait", 0.0), "tower": tower,
                      "tower_forwards": comps.tower_forwards})
        comps.tower_forwards = 0

    train(cfg, factory=factory, on_step=on_step)
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, steps)
    if dist.get_rank() == 0:
        with open(args.result, "w") as fh:
            json.dump(per_rank, fh)
    shutdown()  # the rank's one teardown before the interpreter exits (launcher/distributed.py says why)


# ----------------------------------------------------------------------------- driver

def run(args, config: str, overrides: list, work: str) -> list:
    result = os.path.join(work, "result.json")
    ov = [*overrides, f"train.output_dir={os.path.join(work, 'run')}", f"train.max_steps={args.steps}",
          "checkpoint.every_steps=100000", "checkpoint.resume=none", "train.warmup_steps=1",
          "logging.tensorboard=false", f"data.pairs_per_rank={args.pairs}", "eval.every_steps=0"]
    cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", "--nproc-per-node",
           str(args.ranks), os.path.abspath(__file__), "--worker", "--config", config, "--overrides", json.dumps(ov),
           "--result", result]
    threads = max(1, (os.cpu_count() or 2) // args.ranks)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=REPO, HF_HUB_OFFLINE="1")
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"the training run failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    print(f"[bench] training run: {time.monotonic() - t0:.0f}s wall", flush=True)
    with open(result) as fh:
        return json.load(fh)


def summarise(per_rank: list, warmup: int, kind: str) -> dict:
    """Medians over the measured steps of `kind`; the step time is the same on every rank (collectives),
    the tower time is each rank's own: its mean over ranks."""
    measured = [[r for r in steps[warmup:] if r["kind"] == kind] for steps in per_rank]
    med = lambda rows, key: statistics.median(r[key] for r in rows)  # noqa: E731
    return {"step": statistics.mean(med(rows, "step") for rows in measured),
            "step_mean": statistics.mean(statistics.mean(r["step"] for r in rows) for rows in measured),
            "data_wait": statistics.mean(med(rows, "data_wait") for rows in measured),
            "tower": statistics.mean(med(rows, "tower") for rows in measured),
            "steps": len(measured[0])}


def prepare(args, work: str) -> tuple[str, list, str]:
    """(config path, overrides, label) of the model: the demo's, or the tests' tiny one (--tiny)."""
    from tests.helpers.data import synthetic_shards

    n_pairs = max(64, args.pairs * args.ranks * (args.steps + 2))
    if args.tiny:
        from tests.helpers.real_setup import build_inputs

        inputs = build_inputs(os.path.join(work, "tiny"))
        config = os.path.join(REPO, "configs", "tiny_cpu.yaml")
        ov = [f"model.llm.path={inputs['llm']}", f"model.vision.path={inputs['clip']}", "model.connector.num_heads=4",
              f"data.train_shards={inputs['train_shards']}", "data.val_shards=", "data.notes_shards="]
        return config, ov, "tiny Llama + tiny CLIP (tests/helpers), 32 px"
    from notellm2.launcher.config import load_config

    config = args.config
    cfg = load_config(config)
    llm = args.llm or (cfg.model.llm.path if os.path.isabs(cfg.model.llm.path) else os.path.join(REPO, cfg.model.llm.path))
    if not os.path.isfile(os.path.join(llm, "config.json")):
        sys.exit(f"{config}: model.llm.path {llm} is missing; run scripts/prepare_models.py, pass --llm DIR, or --tiny")
    shard_dir, manifest = synthetic_shards(os.path.join(work, "data"), n_notes=max(64, n_pairs // 2), n_categories=8,
                                           n_pairs=n_pairs, shard_size=32, image_size=256, splits=("train",))
    shards = os.path.join(shard_dir, manifest["patterns"]["pairs-train"])
    ov = [f"model.llm.path={llm}", f"data.train_shards={shards}", "data.val_shards=", "data.notes_shards="]
    return config, ov, f"{os.path.basename(config)} ({cfg.model.vision.kind} tower {cfg.model.vision.factory or cfg.model.vision.path}, " \
                       f"{cfg.model.vision.image_size} px)"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--overrides", default="[]", help=argparse.SUPPRESS)
    p.add_argument("--result", default="", help=argparse.SUPPRESS)
    p.add_argument("--config", default=os.path.join(REPO, "configs", "demo_cpu.yaml"))
    p.add_argument("--llm", default=None, help="model.llm.path (default: the config's, relative to the repo)")
    p.add_argument("--tiny", action="store_true", help="the tests' tiny models instead of the demo's")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--pairs", type=int, default=8, help="pairs per rank")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0
    if args.steps - args.warmup < 2:
        sys.exit("--steps must exceed --warmup by 2 or more (one pixel and one cached step at least)")

    from notellm2.launcher.config import load_config
    from notellm2.launcher.train.vision_cache import build_vision_cache

    work = tempfile.mkdtemp(prefix="bench-vcache-")
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # shards, cache and runs: each run left ~1 GB in /tmp
    config, overrides, model = prepare(args, work)
    cfg = load_config(config, overrides)
    cache = os.path.join(work, "vision-cache")
    built = build_vision_cache(cfg, cache, progress=False)
    print(f"[bench] cache: {built['notes_with_features']} notes, {built['bytes'] / 2**20:.1f} MiB "
          f"[{built['num_tokens']} x {built['token_dim']}] + [{built['pooled_dim']}] fp32 per image, written in "
          f"{built['seconds']:.1f} s (tower {built['tower_seconds']:.1f} s)", flush=True)

    per_rank = run(args, config, overrides + [f"data.vision_cache={cache}"], work)
    plain, cached = summarise(per_rank, args.warmup, "pixels"), summarise(per_rank, args.warmup, "cached")
    saved = plain["step"] - cached["step"]
    fraction = saved / plain["tower"] if plain["tower"] > 0 else float("nan")
    breakeven = built["seconds"] / saved if saved > 0 else float("inf")
    print(f"{model}; {args.ranks} rank(s) x {args.pairs} pairs, {cfg.train.precision}; one run of {args.steps} steps, "
          f"pixel and cached steps alternating, {plain['steps']} + {cached['steps']} measured (medians; means in brackets):")
    print(f"  (a) step on pixels          {plain['step']:8.3f} s  [{plain['step_mean']:.3f}]  (data wait {plain['data_wait']:.3f} s)")
    print(f"  (b) step on the cache       {cached['step']:8.3f} s  [{cached['step_mean']:.3f}]  (data wait {cached['data_wait']:.3f} s)")
    print(f"  (c) tower forward per step  {plain['tower']:8.3f} s   ({plain['tower'] / plain['step']:.1%} of (a)); "
          f"on cached steps encode_images takes {cached['tower']:.4f} s")
    print(f"  step time saved (a)-(b)     {saved:8.3f} s   ({saved / plain['step']:.1%} of (a))")
    print(f"  writing the cache: {built['seconds']:.1f} s once, repaid after {breakeven:.1f} steps")
    print(f"fraction of the tower's time removed ((a)-(b))/(c) = {fraction:.3f} (target >= 0.8)")
    result = {"name": "bench_vision_cache", "figure": round(saved, 4), "bound_or_baseline": round(plain["tower"], 4),
              "ratio": round(fraction, 4), "target": ">= 0.8", "pass": bool(fraction >= 0.8),
              "step_s_without_cache": round(plain["step"], 4), "step_s_with_cache": round(cached["step"], 4),
              "tower_s_per_step": round(plain["tower"], 4), "data_wait_s": [round(plain["data_wait"], 4),
                                                                            round(cached["data_wait"], 4)],
              "cache_write_s": round(built["seconds"], 2), "cache_bytes": built["bytes"], "ranks": args.ranks,
              "pairs_per_rank": args.pairs, "measured_steps": [plain["steps"], cached["steps"]],
              "tower_forwards": {kind: sum(r["tower_forwards"] for steps in per_rank for r in steps if r["kind"] == kind)
                                 for kind in ("pixels", "cached")}, "model": model}
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
