"""Rank functions for tests/launcher/train/test_engine_gradients.py (run by tests.helpers.multirank.run_ranks).

One forward + backward of the `notellm2` note model through a real `deepspeed.initialize` ZeRO-3
engine, built the way the trainer builds it (notellm2.launcher.train.engine.build_ds_config / notellm2.launcher.train.components.default_components /
param_groups / build_optimizer, the frozen vision tower outside the engine), on a fixed global batch
of pairs of which this rank takes its share. Rank 0 writes the full gradients (read with
`deepspeed.utils.safe_get_full_grad` after `engine.backward`, before any step) and the full initial
weights to a .pt file; the test compares the files of a 1-rank and a 2-rank launch.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from notellm2.launcher.train.components import default_components
from notellm2.launcher.distributed import detect_topology, init_distributed
from notellm2.launcher.train.engine import build_ds_config
from notellm2.launcher.train.optim import build_optimizer, param_groups
from tests.helpers.configs import tiny_config

WORDS = ["cooking pasta", "travel diary", "lipstick review", "cute kitten", "coffee garden", "city night",
         "rainy street", "old bookshop"]


def global_pairs(num_pairs: int) -> list[tuple[dict, dict]]:
    """The same pairs in every launch. Some targets have no image; the last target is the note of the
    first query, so under 2 ranks a duplicate note sits on another rank (the loss's de-duplication)."""
    def note(k: int, role: str, has_image: bool) -> dict:
        return {"note_id": f"{role}-{k}", "title": f"{WORDS[k % 8]} {k}", "content": f"{WORDS[(k + 3) % 8]} " * (1 + k % 3),
                "topics": [WORDS[(k + 5) % 8]], "has_image": has_image}

    pairs = [(note(k, "query", True), note(k, "target", k % 3 != 1)) for k in range(num_pairs)]
    pairs[-1] = (pairs[-1][0], pairs[0][0])
    return pairs


def _note_hash(note_id: str) -> int:
    return sum(ord(c) * 131 ** i for i, c in enumerate(note_id)) % (2 ** 62)


def _pixels(note_id: str, size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(_note_hash(note_id) % (2 ** 31))
    return torch.randn(3, size, size, generator=g)


def local_batch(prompter, image_size: int, pairs: list[tuple[dict, dict]]) -> dict:
    """This rank's pairs laid out as the loss expects: [queries (B); targets (B)]."""
    notes = [q for q, _ in pairs] + [t for _, t in pairs]
    batch = prompter.collate([prompter.encode(n) for n in notes])
    batch["note_ids"] = torch.tensor([_note_hash(n["note_id"]) for n in notes], dtype=torch.long)
    batch["pixel_values"] = torch.stack([_pixels(n["note_id"], image_size) for n in notes])
    return batch


def _build_engine(llm_dir: str, clip_dir: str, pairs_per_rank: int, scale_by_world_size: bool, world: int):
    import deepspeed

    overrides = [f"model.llm.path={llm_dir}", f"model.vision.path={clip_dir}",
                 # the loader is never built here (the batch is made in this file); the key must only be set
                 "data.train_shards=unused-by-this-test-{000000..000001}.tar",
                 f"data.pairs_per_rank={pairs_per_rank}", "train.precision=fp32", "train.grad_clip=0",
                 f"loss.scale_by_world_size={str(scale_by_world_size).lower()}"]
    cfg = tiny_config(None, *overrides)
    assert cfg.train.ds_config == "ds_configs/cpu_zero3.json"
    ds_config = build_ds_config(cfg, world)
    assert ds_config["zero_optimization"]["stage"] == 3 and ds_config["gradient_clipping"] == 0
    torch.manual_seed(cfg.train.seed)  # as notellm2.launcher.train.train._train does before the factory
    comps = default_components(cfg, dist.get_rank(), world, ds_config)
    tower = comps.vision_tower.eval()
    for p in tower.parameters():
        p.requires_grad_(False)
    model = comps.note_model
    # Deterministic forwards: no live dropout module, and no functional dropout rate (Llama's attention_dropout).
    dropouts = [f"{n}: p={m.p}" for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    dropouts += [f"{n}.{k}={v}" for n, m in model.named_modules() for k, v in vars(m).items()
                 if "dropout" in k and isinstance(v, float) and v > 0]
    optimizer = build_optimizer(param_groups(model, cfg.train.lr_llm, cfg.train.lr_new, cfg.train.weight_decay),
                                ds_config)
    assert isinstance(optimizer, torch.optim.AdamW)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                           dist_init_required=False)
    return engine, tower, comps, cfg, dropouts


def one_step_gradients(llm_dir: str, clip_dir: str, total_pairs: int, out_dir: str,
                       scales: tuple = (False,)) -> dict:
    """For each value in `scales` (loss.scale_by_world_size): build the engine, forward + backward this
    rank's share of `global_pairs(total_pairs)`, write rank 0's full gradients to out_dir."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    init_distributed(detect_topology(), timeout_s=120)
    rank, world = dist.get_rank(), dist.get_world_size()
    assert total_pairs % world == 0
    per_rank = total_pairs // world
    result = {"world": world}
    for scale in scales:
        engine, tower, comps, cfg, dropouts = _build_engine(llm_dir, clip_dir, per_rank, bool(scale), world)
        engine.train()
        named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
        partitioned = all(hasattr(p, "ds_id") for _, p in named)
        held = sum(p.ds_tensor.numel() for _, p in named) / sum(p.ds_numel for _, p in named)
        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            initial = {n: p.detach().clone().float() for n, p in named}
        pairs = global_pairs(total_pairs)[rank * per_rank:(rank + 1) * per_rank]
        batch = local_batch(comps.prompter, cfg.model.vision.image_size, pairs)
        with torch.no_grad():  # the frozen tower runs outside the engine, as in the training loop
            image_tokens, image_pooled = tower(batch["pixel_values"])
        out = engine(batch, image_tokens=image_tokens, image_pooled=image_pooled)
        engine.backward(out["loss"])
        grads, missing = {}, []
        for n, p in named:  # a collective under ZeRO-3: every rank, same order
            g = safe_get_full_grad(p)
            if g is None:
                missing.append(n)
            else:
                grads[n] = g.detach().clone().float().cpu()
        loss = out["loss"].detach().float().reshape(1).clone()
        dist.all_reduce(loss)
        tag = f"world{world}-scale{int(bool(scale))}"
        if rank == 0:
            torch.save({"grads": grads, "initial": initial}, os.path.join(out_dir, f"{tag}.pt"))
        result[tag] = {"mean_loss": loss.item() / world, "missing": missing, "dropouts": dropouts,
                       "partitioned": partitioned, "held_fraction": held, "n_params": len(named),
                       "scale_by_world_size": engine.module.loss_fn.scale_by_world_size}
        engine.destroy()
        dist.barrier()
    return result
