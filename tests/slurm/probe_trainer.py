"""A small stand-in trainer with the same command line as `notellm2 train`, for Slurm plumbing tests.

    torchrun ... tests/slurm/probe_trainer.py --config run.yaml train.output_dir=... checkpoint.resume=auto

It loads the run config the real way (`launcher.config.load_config`), joins the process group
torchrun set up (gloo), fits a linear model with gradients all-reduced by hand, checkpoints every
`checkpoint.every_steps` (rank 0 writes `checkpoints/step_N/state.pt` and `checkpoints/latest.json`),
resumes from `latest.json` when `checkpoint.resume` is auto, and stops on SIGUSR1/SIGTERM through
`launcher.preemption.PreemptionFlag` (checkpoint, then exit code 75). Every rank appends one JSON line
per step to `metrics.rank<R>.jsonl`: step, loss, world size, the step it started from, its node's
hostname-independent node rank (GROUP_RANK). PROBE_STEP_SLEEP (seconds) slows the steps down.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from launcher.config import load_config  # noqa: E402
from launcher.preemption import PREEMPTED_EXIT_CODE, PreemptionFlag  # noqa: E402


def _save(run_dir: str, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    ckpt_dir = os.path.join(run_dir, "checkpoints", f"step_{step}")
    os.makedirs(ckpt_dir, exist_ok=True)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, os.path.join(ckpt_dir, "state.pt"))
    tmp = os.path.join(run_dir, "checkpoints", "latest.json.tmp")
    with open(tmp, "w") as fh:
        json.dump({"step": step, "path": ckpt_dir}, fh)
    os.replace(tmp, os.path.join(run_dir, "checkpoints", "latest.json"))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    run_dir = cfg.train.output_dir
    sleep_s = float(os.environ.get("PROBE_STEP_SLEEP", "0"))

    flag = PreemptionFlag.install()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(cfg.train.seed)
    model = torch.nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    start = 0
    latest = os.path.join(run_dir, "checkpoints", "latest.json")
    if cfg.checkpoint.resume == "auto" and os.path.exists(latest):
        with open(latest) as fh:
            info = json.load(fh)
        state = torch.load(os.path.join(info["path"], "state.pt"))
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    os.makedirs(run_dir, exist_ok=True)
    target_w = torch.arange(8, dtype=torch.float32)
    log = open(os.path.join(run_dir, f"metrics.rank{rank}.jsonl"), "a")
    for step in range(start + 1, cfg.train.max_steps + 1):
        g = torch.Generator().manual_seed(step * 1000 + rank)
        x = torch.randn(16, 8, generator=g)
        y = x @ target_w
        loss = torch.nn.functional.mse_loss(model(x).squeeze(-1), y)
        opt.zero_grad()
        loss.backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world
        opt.step()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        log.write(json.dumps({"step": step, "loss": mean_loss.item() / world, "world_size": world, "start_step": start,
                              "node_rank": int(os.environ.get("GROUP_RANK", "-1"))}) + "\n")
        log.flush()
        if sleep_s:
            time.sleep(sleep_s)
        stop = flag.should_stop()
        if (step % cfg.checkpoint.every_steps == 0 or step == cfg.train.max_steps or stop) and rank == 0:
            _save(run_dir, step, model, opt)
        if stop:
            dist.barrier()
            print(f"[probe] rank {rank}: stopping after step {step} ({flag.signal_name})", flush=True)
            log.close()
            _leave(PREEMPTED_EXIT_CODE)
    dist.barrier()
    log.close()
    _leave(0)
    return 0


def _leave(code: int) -> None:
    # os._exit skips the gloo process group's teardown: under load, destroy_process_group /
    # interpreter shutdown sometimes aborted a rank here ("terminate called without an active
    # exception", SIGABRT) after all its work was done, which made the job look failed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
