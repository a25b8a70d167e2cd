"""Rank functions for tests/launcher/train/test_chunked_gradients.py (run by tests.helpers.multirank.run_ranks).

One batch through `notellm2.launcher.train.chunked.forward_backward` (the training loop's own call) on a real
`deepspeed.initialize` engine built as the trainer builds it (default_components, param_groups,
build_optimizer; the frozen tower outside the engine), whole or in chunks, on this rank's share of a
fixed global batch (tests/launcher/train/engine_grad_cases.py). Every run starts from the same
weights and the same generator state, so the dropout masks of a correct chunked step are those of the
unchunked step. Rank 0 writes the full gradients (`safe_get_full_grad` after the backward, before any
optimizer step) of each run to a .pt file.
"""
from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

from notellm2.launcher.train.chunked import forward_backward
from notellm2.launcher.train.components import default_components
from notellm2.launcher.distributed import detect_topology, init_distributed
from notellm2.launcher.train.engine import build_ds_config
from notellm2.launcher.train.optim import build_optimizer, param_groups
from notellm2.modeling.connector import KeyedDropout
from tests.helpers.configs import tiny_config
from tests.helpers.models import warm_lora
from tests.launcher.train.engine_grad_cases import global_pairs, local_batch

ZERO2 = {"zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True,
                               "reduce_bucket_size": 5e6},
         "zero_allow_untested_optimizer": True, "steps_per_print": 1000000000}


def _engine(llm_dir: str, clip_dir: str, per_rank: int, run: dict, out_dir: str, world: int):
    import deepspeed

    ds_path = "ds_configs/cpu_zero3.json"
    if run.get("stage") == 2:
        # one file per rank: both ranks writing one path raced (a rank read it half-written)
        ds_path = os.path.join(out_dir, f"cpu_zero2.rank{dist.get_rank()}.json")
        with open(ds_path, "w") as fh:
            json.dump(ZERO2, fh)
    cfg = tiny_config(None, f"model.llm.path={run.get('llm', llm_dir)}", f"model.vision.path={clip_dir}",
                      "data.train_shards=unused-by-this-test-{000000..000001}.tar",
                      f"data.pairs_per_rank={per_rank}", "train.precision=fp32", "train.grad_clip=0",
                      f"train.ds_config={ds_path}", f"model.variant={run['variant']}",
                      f"model.connector.dropout={run.get('dropout', 0.0)}", f"train.chunk_pairs={run['chunk']}",
                      f"train.grad_accum_steps={run.get('accum', 1)}", *run.get("overrides", ()))
    ds_config = build_ds_config(cfg, world)
    torch.manual_seed(cfg.train.seed)  # as notellm2.launcher.train.train._train does before the factory
    comps = default_components(cfg, dist.get_rank(), world, ds_config)
    comps.freeze_vision_tower(torch.device("cpu"))
    model = comps.note_model
    if run.get("warm"):  # LoRA: adapters as after some steps (B is zero at init, so A would get no gradient)
        warm_lora(model)
    if run.get("stage") == 2:
        # ZeRO-2's gradient is read from one plain SGD step with lr 1: (weights before) - (weights after).
        # (safe_get_full_grad returns a rank's own unreduced param.grad under ZeRO-2 when one is set.)
        optimizer = torch.optim.SGD(param_groups(model, 1.0, 1.0, 0.0), lr=1.0)
    else:
        optimizer = build_optimizer(param_groups(model, cfg.train.lr_llm, cfg.train.lr_new, cfg.train.weight_decay),
                                    ds_config)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, dist_init_required=False)
    return engine, comps, cfg


def chunked_gradients(llm_dir: str, clip_dir: str, total_pairs: int, out_dir: str, runs: list) -> dict:
    """For each run {"tag", "variant", "chunk", "dropout", "replay", "stage", "cached", "accum", "negatives", "llm" (another
    LLM dir), "overrides" (dotted config keys), "warm" (LoRA adapters moved off their init)}: a fresh engine, one
    forward_backward of this rank's pairs, rank 0 saves {tag}.pt with the full gradients."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    init_distributed(detect_topology(), timeout_s=120)
    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = total_pairs // world
    result = {"world": world}
    for run in runs:
        accum = run.get("accum", 1)  # micro-batches of per_rank / accum pairs, one optimizer step
        micro = per_rank // accum
        engine, comps, cfg = _engine(llm_dir, clip_dir, micro, run, out_dir, world)
        engine.train()
        if run.get("negatives"):  # on the live loss (the config's keys would make the loader look for note_stats)
            engine.module.loss_fn.logq_correction = engine.module.loss_fn.mask_known_positives = True
        named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
        stage3 = run.get("stage", 3) == 3
        partitioned = all(hasattr(p, "ds_id") for _, p in named)
        with deepspeed.zero.GatheredParameters([p for _, p in named] if stage3 else []):
            initial = {n: p.detach().clone().float() for n, p in named}
        pairs = global_pairs(total_pairs)[rank * per_rank:(rank + 1) * per_rank]
        torch.manual_seed(1234 + rank)  # the same generator state for every run: the same dropout masks
        steps = run.get("steps", 1)  # steps - 1 whole optimizer steps first; the last one is read
        gathers = _count_all_gathers()
        for step in range(steps):
            last = step == steps - 1
            if last:
                gathers["n"] = 0
            out = _one_step(engine, comps, cfg, run, pairs, micro, accum, stage3, last)
        coordinator = getattr(getattr(engine.optimizer, "parameter_offload", None), "get_param_coordinator", None)
        complete_trace = bool(coordinator().is_complete_trace()) if coordinator else None
        all_gathers = gathers["n"]
        gathers["undo"]()
        rng_after = torch.get_rng_state()
        grads, missing = {}, []
        for n, p in named:  # a collective under ZeRO-3: every rank, same order
            g = safe_get_full_grad(p) if stage3 else (initial[n] - p.detach().float())
            if g is None:
                missing.append(n)
            else:
                grads[n] = g.detach().clone().float().cpu()
        scalars = {k: float(out[k].detach().float()) for k in ("loss", "loss_mm", "loss_vis", "logit_scale",
                                                               "gate_mean", "gate_std") if out.get(k) is not None}
        if rank == 0:
            torch.save({"grads": grads, "initial": initial, "rng_after": rng_after,
                        "embeddings": out["embeddings"].detach().clone()}, os.path.join(out_dir, f"{run['tag']}.pt"))
        keyed = [m.p for m in engine.module.modules() if isinstance(m, KeyedDropout)]
        result[run["tag"]] = {"scalars": scalars, "missing": missing, "partitioned": partitioned,
                              "complete_trace": complete_trace, "all_gathers": all_gathers,
                              "keyed_dropouts": len(keyed), "dropout_p": sorted(set(keyed)), "n_params": len(named),
                              "stage": engine.zero_optimization_stage()}
        engine.destroy()
        dist.barrier()
    return result


def _count_all_gathers() -> dict:
    """Counts ZeRO-3's parameter all-gathers (deepspeed.comm.allgather_fn, looked up at every call by
    partition_parameters) in {"n"}; {"undo"}() puts the function back."""
    import deepspeed.comm as ds_comm

    real, counter = ds_comm.allgather_fn, {"n": 0}

    def counted(*args, **kwargs):
        counter["n"] += 1
        return real(*args, **kwargs)

    ds_comm.allgather_fn = counted
    counter["undo"] = lambda: setattr(ds_comm, "allgather_fn", real)
    return counter


def _one_step(engine, comps, cfg, run, pairs, micro, accum, stage3, read):
    """One optimizer step's micro-batches through forward_backward; `read`: the step whose gradient is read
    (under ZeRO-3 its boundary step is left to the caller). Returns the last micro-batch's outputs."""
    for m in range(accum):
        batch = local_batch(comps.prompter, cfg.model.vision.image_size, pairs[m * micro:(m + 1) * micro])
        if run.get("cached"):  # a vision-cache batch (data.vision_cache): the tower's features, no pixels
            from notellm2.modeling.vision import tower_key

            image_tokens, image_pooled = comps.image_features(batch)
            del batch["pixel_values"]
            batch.update(image_tokens=image_tokens, image_pooled=image_pooled,
                         vision_cache_key=tower_key(comps.vision_tower), vision_cache="in-memory")
        if run.get("negatives"):  # both negative options, with per-note inputs as the loader adds them
            ids = batch["note_ids"]
            batch["sample_logq"] = -1.0 - (ids % 7).float() / 3  # a fixed function of the note
            batch["known_pos"] = torch.stack([ids.roll(1), torch.full_like(ids, -2)], dim=1)
        out = forward_backward(engine, comps, batch, torch.device("cpu"), None, run["chunk"],
                               replay_rng=run.get("replay", True))
        # as the training loop: engine.step() after every micro-batch (a no-op before the boundary);
        # under ZeRO-3 the full gradient of the read step is read before the boundary's step
        if not (stage3 and read) or m < accum - 1:
            engine.step()
    return out
