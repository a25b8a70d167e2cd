"""The training loop (`notellm2 train`): DeepSpeed ZeRO engine around the note model, our own loop.

    rank/world from torchrun or Slurm -> process group (gloo on CPU, nccl on GPU) + watchdog
    resume decision (same world size: exact; other world size: universal checkpoint)  launcher/train/checkpoint.py
    DeepSpeed JSON + YAML batch sizes -> build the components (LLM partitioned)       launcher/train/engine.py, components.py
    client AdamW (param groups) + LR schedule -> deepspeed.initialize                  launcher/train/engine.py
    loop: batch -> frozen vision tower (no_grad, replicated) -> engine forward/backward/step
          (whole, or in chunks of train.chunk_pairs with cached representations)       launcher/train/chunked.py
          -> step stats, one all-reduce -> metrics (rank 0)                            launcher/train/metrics.py
          -> checkpoint every N steps, on a stop request and at the end                launcher/train/checkpoint.py

What is built comes from a *components factory* (launcher/train/components.py); tests pass their own
through `train(cfg, factory=...)`. Test-only fault hooks: launcher/train/faults.py.
"""
from __future__ import annotations

import os
import sys
import time
import warnings
from typing import Callable, Optional

import torch

from notellm2.launcher.train import faults
from notellm2.launcher.train.checkpoint import Checkpointer, CheckpointError
from notellm2.launcher.train.chunked import check_chunkable, forward_backward
from notellm2.launcher.train.components import BAD_SAMPLES_DIR, BatchStream, default_components
from notellm2.errors import UserError
from notellm2.launcher.config import ConfigError, RunConfig, save_resolved
from notellm2.launcher.distributed import (Topology, Watchdog, all_gather_object, barrier, detect_topology,
                                  enable_crash_traces, init_distributed, is_peer_error)
from notellm2.launcher.train.engine import activation_dtype, build_ds_config, initialize, learning_rates
from notellm2.launcher.train.metrics import (MetricsWriter, RunReport, StepStats, Timer, gather_counters, memory_mb,
                                            step_scalars)
from notellm2.launcher.train.optim import clamp_temperature
from notellm2.launcher.train.preemption import PREEMPTED_EXIT_CODE, Preempted, install_for_training
from notellm2.launcher.train.validation import TowerMemo, read_val_pairs, retrieval_metrics, validation_loss


def train(cfg: RunConfig, factory: Optional[Callable] = None, topo: Optional[Topology] = None,
          on_step: Optional[Callable[[int, dict], None]] = None) -> dict:
    """Run training to cfg.train.max_steps. Returns a summary dict (rank-local)."""
    enable_crash_traces()  # first: a native crash anywhere below prints every thread's stack to this rank's log
    topo = topo or detect_topology()
    # torch 2.13 deprecation notices from inside DeepSpeed, once per collective call: keep the console readable.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed", category=FutureWarning)
    rank, world = topo.rank, topo.world_size
    factory = factory or default_components
    preflight = getattr(factory, "preflight", None)
    if preflight is not None:  # the user's inputs, before a process group starts or a model loads (one line each)
        preflight(cfg, world)
    timeout = cfg.train.collective_timeout_s
    # The watchdog speaks first; the gloo timeout is the second line of defence.
    init_distributed(topo, timeout_s=int(timeout * 1.5) + 10)
    watchdog = Watchdog(rank, world, timeout).start()
    log = (lambda *a: print("[rank 0]", *a, flush=True)) if rank == 0 else (lambda *a: None)
    step = 0
    try:
        summary = _train(cfg, factory, topo, watchdog, log, on_step)
        step = summary["step"]
        watchdog.progress(step, "done")
        watchdog.stop()
        barrier()
        return summary
    except Preempted:
        raise
    except BaseException as e:
        peer_error = world > 1 and is_peer_error(e)
        where = f"at step {watchdog.step} ({watchdog.phase})"
        msg = (f"rank {rank}: a collective failed {where}, most likely because of another rank: {e}" if peer_error
               else f"rank {rank} failed {where}: {type(e).__name__}: {e}")
        if not peer_error:
            # Our own failure: say so in the store first, so that the other ranks' messages name us.
            watchdog.mark_failed(f"{type(e).__name__}: {e}")
        if isinstance(e, UserError) and not peer_error:
            raise  # the user's input: the CLI prints it as its one line (notellm2.launcher.cli.main)
        print(f"[rank {rank}] {msg}", file=sys.stderr, flush=True)
        if world > 1 and not isinstance(e, (ConfigError, CheckpointError)):
            time.sleep(1.0)  # let a failing peer publish its mark
            try:
                print(f"[rank {rank}] {watchdog.diagnose(exclude=(rank,))}", file=sys.stderr, flush=True)
            except Exception:
                pass
        raise
    finally:
        # On every way out (done, preempted, a user error, a crash): no watchdog thread may still be inside a
        # store call when the interpreter finalises (notellm2.launcher.distributed.shutdown says why).
        watchdog.stop()


def _train(cfg: RunConfig, factory: Callable, topo: Topology, watchdog: Watchdog, log, on_step) -> dict:
    rank, world = topo.rank, topo.world_size
    run_dir = cfg.train.output_dir
    device = torch.device("cuda", topo.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    if rank == 0:
        save_resolved(cfg, run_dir)
    checkpointer = Checkpointer(cfg, rank, world, log)
    load_universal = checkpointer.find_resume(watchdog)

    ds_config = build_ds_config(cfg, world, load_universal=load_universal)
    torch.manual_seed(cfg.train.seed)
    comps = factory(cfg, rank, world, ds_config)
    comps.freeze_vision_tower(device)
    if comps.extra.get("vision_cache") is not None:
        log(f"image features from the {comps.extra['vision_cache'].describe()}: the vision tower does not run")
    check_chunkable(comps.note_model, cfg.train.chunk_pairs, ds_config["zero_optimization"].get("stage", 0))
    engine, scheduler, group_names = initialize(cfg, comps.note_model, ds_config)
    watchdog.progress(0, "initialised")

    resumed = checkpointer.resume(engine)
    # Training mode for every module the engine trains: transformers' from_pretrained hands the LLM back
    # in eval mode, which left its dropout off and its activation checkpointing skipped (transformers runs
    # it only while training) until the first validation switched the model to training mode.
    engine.module.train()
    if resumed.fresh:
        torch.manual_seed(cfg.train.seed + 1000 + rank)
    batches = BatchStream(comps.make_loader, resumed.epoch, resumed.reader_state)

    evaluate = bool(cfg.eval.every_steps) and comps.make_val_loader is not None
    if evaluate:
        try:  # fail now, not at the first evaluation
            comps.make_val_loader()
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"data.val_shards: cannot evaluate every {cfg.eval.every_steps} steps: {e}") from None
    retrieval = bool(cfg.eval.every_steps) and bool(cfg.eval.notes_shards)
    val_pairs = []
    if retrieval:
        try:  # the user's paths, checked now rather than at the first evaluation
            val_pairs = read_val_pairs(cfg)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"eval.pairs: {e}") from None
    memo = TowerMemo(comps.vision_tower, cfg.eval.tower_memo_mb)  # the frozen tower's eval outputs, once per run
    preempt = install_for_training()
    metrics = MetricsWriter(run_dir, enabled=rank == 0, tensorboard=cfg.logging.tensorboard,
                            max_steps=cfg.train.max_steps, start_step=resumed.step)
    timer = Timer()
    report = RunReport(checkpointer.best_metric, t0=time.monotonic(), start_step=resumed.step)
    cast = activation_dtype(cfg)
    step = resumed.step
    accum = cfg.train.grad_accum_steps
    chunk = cfg.train.chunk_pairs
    log(f"training steps {resumed.step + 1}..{cfg.train.max_steps} on {world} rank(s), "
        f"{cfg.data.pairs_per_rank} pairs/rank x {accum} accumulation"
        f"{f' (in chunks of {chunk} pairs, cached representations)' if chunk else ''}; run dir {run_dir}")

    try:
        while step < cfg.train.max_steps:
            step += 1
            faults.at_step_start(rank, step)
            watchdog.progress(step, "data", arm=True)
            t_step = time.perf_counter()
            lrs = learning_rates(engine, scheduler)  # the rates this step uses (its engine.step advances them)
            stats = StepStats()
            for _ in range(accum):
                with timer("data_wait"):
                    batch = batches.next()
                stats.add_batch(batch)
                watchdog.progress(step, "forward")
                # to_device (pixels normalised there), frozen tower, engine forward + backward; in chunks
                # of train.chunk_pairs when set (launcher/train/chunked.py: same loss and gradient)
                out = forward_backward(engine, comps, batch, device, cast, chunk, timer,
                                       on_phase=lambda phase: watchdog.progress(step, phase))
                watchdog.progress(step, "optimizer")
                with timer("optimizer"):
                    engine.step()
                    clamp_temperature(engine, cfg.loss.max_scale)  # log_scale <= log(max_scale), master and model
                stats.add_outputs(out, accum)
            stats.step_time_s = time.perf_counter() - t_step
            timings = timer.pop()
            watchdog.progress(step, "metrics")

            stats.data_wait_s = timings.get("data_wait", 0.0)
            stats.stop_asked = float(preempt.requested)  # folded into the one all-reduce: see launcher/train/preemption.py
            summed = stats.all_reduced()  # the one all-reduce of the figures that differ per rank
            memory = all_gather_object(memory_mb())
            counters = gather_counters(batches.loader)
            grad_norm = engine.get_global_grad_norm()
            scalars = step_scalars(stats, summed, world, group_names, lrs, grad_norm, memory, counters)
            if cfg.eval.every_steps and step % cfg.eval.every_steps == 0:
                t_eval = time.perf_counter()
                tick = lambda: watchdog.progress(step, "eval")  # noqa: E731
                found = validation_loss(engine, comps, device, cast, tick, memo) if evaluate else {}
                if retrieval:
                    found.update(retrieval_metrics(engine, comps, cfg, rank, world, tick, val_pairs, memo))
                scalars.update({f"eval/{k}": v for k, v in found.items()})
                scalars["perf/eval_s"] = time.perf_counter() - t_eval
                report.evaluation(step, {f"eval/{k}": v for k, v in found.items()})
                log(f"step {step}: evaluation: {report.eval_line(step)} ({scalars['perf/eval_s']:.1f} s; tower outputs "
                    f"reused for {memo.hits} batches so far, {memo.bytes / 2**20:.1f} MiB kept)")
                if checkpointer.best_metric and checkpointer.best_metric not in scalars:
                    raise ConfigError(f"checkpoint.keep_best: {checkpointer.best_metric!r} is not logged at evaluations; "
                                      f"they log: {', '.join(sorted(k for k in scalars if k.startswith('eval/'))) or 'nothing'}")

            timing_extra = {"timings": {k: round(v, 6) for k, v in timings.items()},
                            "mean_step_time_s": summed.step_time_s / world}
            metrics.log(step, scalars, extra=timing_extra)
            if step % cfg.logging.log_every_steps == 0 or step == cfg.train.max_steps:
                metrics.progress(step, scalars)
            if on_step is not None:
                on_step(step, {"scalars": scalars, "timings": timings, "engine": engine})

            if step % cfg.checkpoint.every_steps == 0 or step == cfg.train.max_steps or checkpointer.improves(scalars):
                watchdog.progress(step, "checkpoint")
                checkpointer.save(step, batches, scalars)
            if preempt.agree(summed.stop_asked > 0) and step < cfg.train.max_steps:
                _stop(step, checkpointer, batches, watchdog, preempt, log)
    finally:
        metrics.close()
    if checkpointer.last_saved != step and step > 0:
        checkpointer.save(step, batches)
    samples_seen = checkpointer.samples_seen(step)
    for line in report.summary(step, cfg.train.max_steps, samples_seen, gather_counters(batches.loader),
                               os.path.join(run_dir, BAD_SAMPLES_DIR)):
        log(line)
    return {"step": step, "samples_seen": samples_seen, "engine": engine, "components": comps,
            "evaluations": report.evaluations}


def _stop(step: int, checkpointer: Checkpointer, batches, watchdog: Watchdog, preempt, log) -> None:
    """A rank got SIGUSR1/SIGTERM (Slurm's time-limit warning, preemption): every rank saw the flag in
    the same all-reduce, so all checkpoint after this step (unless just done) and exit together."""
    if checkpointer.last_saved != step:
        watchdog.progress(step, "checkpoint")
        checkpointer.save(step, batches)
    log(f"stop requested ({preempt.signal_name or 'another rank'}): checkpoint of step {step} written; "
        f"exiting with code {PREEMPTED_EXIT_CODE} so that the job can be requeued and resume")
    raise Preempted(step)
