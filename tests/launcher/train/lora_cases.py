"""Rank functions for tests/launcher/train/test_lora_roundtrip.py (run by tests.helpers.multirank.run_ranks).

`watched_training` runs the real training loop (`notellm2.launcher.train.train.train`, what `notellm2 train`
calls) with LoRA and writes, from rank 0: the adapters as built (before deepspeed.initialize, whole), the
adapters gathered from their ZeRO-3 partitions after every checkpointed step (what the checkpoint of that
step must hold), the adapters after the run (a run resumed at its last step trains nothing: what it
loaded), and the live model's vectors of the export's reference notes (`export_dir`: then rank 0 also
exports the run there)."""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist


def _gathered(module) -> dict:
    """The adapters and placeholder rows, whole (a collective under ZeRO-3: every rank calls it)."""
    import deepspeed

    from notellm2.modeling.lora import adapter_state

    named = sorted(adapter_state(module).items())
    with deepspeed.zero.GatheredParameters([p for _, p in named]):
        return {n: p.detach().clone().float() for n, p in named}


def _live_reference_vectors(engine, comps, cfg, notes_dir: str) -> dict:
    """The live (partitioned) model's vectors of the export's reference notes, batched as the export's own
    write_reference batches them (every rank runs the same forwards: ZeRO-3 gathers)."""
    from notellm2.modeling.pretrained import EncoderConfig, NoteEncoder, _resolve_images, reference_notes

    notes = reference_notes(notes_dir)
    live = NoteEncoder(engine.module, comps.vision_tower, comps.prompter, EncoderConfig(cfg.model, cfg.loss))
    out = {}
    for mode in live.reference_modes():
        chosen = [n for n in notes if mode != "image" or n.get("image")]
        out[mode] = live.encode(_resolve_images(chosen, notes_dir), batch_size=len(chosen) or 1, mode=mode)
    return out


def watched_training(config: str, out_dir: str, overrides: list, export_dir: str = "") -> dict:
    from notellm2.launcher.config import load_config
    from notellm2.launcher.train.components import default_components
    from notellm2.launcher.train.train import train
    from notellm2.modeling.lora import adapter_state

    cfg = load_config(config, overrides)
    rank = int(os.environ.get("RANK", "0"))

    def factory(cfg_, rank_, world, ds_config):
        comps = default_components(cfg_, rank_, world, ds_config)
        if rank_ == 0:  # not partitioned yet: the adapters as initialised
            torch.save({n: p.detach().clone().float() for n, p in adapter_state(comps.note_model).items()},
                       os.path.join(out_dir, "initial.pt"))
        return comps

    in_eval_mode = {}

    def on_step(step, info):
        # modules left in eval mode during the step (from_pretrained returns the LLM in eval mode)
        in_eval_mode[step] = sorted(n for n, m in info["engine"].module.named_modules() if not m.training)
        if step % cfg.checkpoint.every_steps == 0 or step == cfg.train.max_steps:
            live = _gathered(info["engine"].module)
            if rank == 0:
                torch.save(live, os.path.join(out_dir, f"live_{step}.pt"))

    summary = train(cfg, factory=factory, on_step=on_step)
    engine, comps = summary["engine"], summary["components"]
    final = _gathered(engine.module)
    result = {"step": summary["step"], "world": dist.get_world_size(), "in_eval_mode": in_eval_mode}
    if export_dir:
        vectors = _live_reference_vectors(engine, comps, cfg, os.path.join(out_dir, f"reference-rank{rank}"))
        dist.barrier()
        if rank == 0:
            from notellm2.launcher.export import export

            np.savez(os.path.join(out_dir, "live_vectors.npz"), **vectors)
            export(cfg.train.output_dir, export_dir)
        dist.barrier()
    if rank == 0:
        torch.save(final, os.path.join(out_dir, "final.pt"))
    return result
