"""Model state per rank and step time with LoRA (`model.llm.lora`) against full fine-tuning, in one run.

Model: configs/demo_cpu.yaml (SmolLM2-135M truncated to 4 layers, frozen EfficientNet-Lite0, Q-Former), ZeRO-3
on 2 CPU ranks, on synthetic 224 px shards written here; `--tiny`: the tests' tiny Llama + tiny CLIP
(configs/tiny_cpu.yaml), for the benchmark's own test. Two runs of the real training loop under torchrun
(bench_train_step.py's worker), the same pairs and steps: the full fine-tune, then LoRA (rank `--rank`,
alpha 2 x rank, on the architecture's default modules; the connector, gate, head and temperature trained
in full as always).

Figures (medians of the steps after `--warmup`; model state read from the DeepSpeed engine at the last step:
parameter partitions incl. the frozen LLM weights, fp32 master partitions, gradient partitions, Adam states):
  * model state per rank, LoRA / full fine-tune; target <= 0.35;
  * step time, LoRA / full fine-tune (reported, no target: the frozen weights are still gathered and
    back-propagated through; only their gradients, reduce-scatters and optimizer updates go).

    .venv/bin/python benchmarks/bench_lora.py [--steps 6 --warmup 2 --pairs 8 --rank 8 | --tiny]

Needs artifacts/models/smollm2-135m (scripts/prepare_models.py) and the efficientnet packages (not --tiny).
Ends with one `RESULT {json}` line.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import statistics
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

from bench_train_step import demo_config_or_exit, driver_parser, make_shards, median, run  # noqa: E402

TARGET = 0.35
MIB = 2 ** 20


def tiny_models(work: str) -> list[str]:
    """The tests' tiny Llama (2 layers, width 64) and tiny CLIP as overrides of configs/tiny_cpu.yaml."""
    from tests.helpers.models import make_tiny_clip_dir, make_tiny_llm_dir

    root = os.path.join(work, "models")
    return [f"model.llm.path={make_tiny_llm_dir(root, arch='llama', num_layers=2, hidden=64)}",
            f"model.vision.path={make_tiny_clip_dir(root, hidden=32, layers=2)}", "model.connector.num_heads=4"]


def main() -> int:
    p = driver_parser(__doc__)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--pairs", type=int, default=8, help="pairs per rank")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha is twice it)")
    p.add_argument("--tiny", action="store_true", help="the tests' tiny models (configs/tiny_cpu.yaml)")
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="bench-lora-")
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # its shards and runs: gigabytes a run
    models = []
    if args.tiny:
        args.config = os.path.join(REPO, "configs", "tiny_cpu.yaml")
        models = tiny_models(work)
    else:
        demo_config_or_exit(args.config)
    from notellm2.launcher.config import load_config

    cfg = load_config(args.config, models)
    shards = make_shards(os.path.join(work, "data"), n_pairs=max(256, 2 * args.pairs * args.steps * 2))
    lora = [f"model.llm.lora.enabled=true", f"model.llm.lora.rank={args.rank}", f"model.llm.lora.alpha={2 * args.rank}"]
    full_rows = run(2, args, shards, work, extra=tuple(models), tag="-full")
    lora_rows = run(2, args, shards, work, extra=(*models, *lora), tag="-lora")

    def figures(rows):
        steps = [r for r in rows if "step" in r][args.warmup:]
        states = [r for r in rows if "model_state" in r][0]["model_state"]
        return median(steps, "step"), statistics.mean(m["total"] for m in states), states

    full_step, full_state, full_states = figures(full_rows)
    lora_step, lora_state, lora_states = figures(lora_rows)
    print(f"2 ranks x {args.pairs} pairs, {cfg.train.precision}, {cfg.model.llm.path} "
          f"({cfg.model.llm.num_layers or 'all'} layers), LoRA rank {args.rank}, "
          f"{args.steps - args.warmup} measured steps (median)")
    print("model state held per rank (MiB): params (incl. frozen) / fp32 master / grads / optimizer = total")
    for label, states in (("full", full_states), ("LoRA", lora_states)):
        for r, m in enumerate(states):
            print(f"  {label:<4} rank {r}: {m['params'] / MIB:.1f} / {m['master'] / MIB:.1f} / {m['grads'] / MIB:.1f} / "
                  f"{m['optimizer'] / MIB:.1f} = {m['total'] / MIB:.1f}")
    ratio, time_ratio = lora_state / full_state, lora_step / full_step
    print(f"model state per rank: LoRA {lora_state / MIB:.1f} MiB vs full {full_state / MIB:.1f} MiB, ratio {ratio:.3f} "
          f"(target <= {TARGET})")
    print(f"step time: LoRA {lora_step:.3f} s vs full {full_step:.3f} s, ratio {time_ratio:.3f}")
    print("RESULT " + json.dumps({
        "name": "lora_model_state_per_rank_vs_full", "figure": int(lora_state), "bound_or_baseline": int(full_state),
        "ratio": round(ratio, 4), "target": f"<= {TARGET}", "pass": ratio <= TARGET,
        "step_time_s": round(lora_step, 4), "full_step_time_s": round(full_step, 4),
        "step_time_ratio": round(time_ratio, 4), "lora_rank": args.rank, "model": "tiny" if args.tiny else "demo"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
