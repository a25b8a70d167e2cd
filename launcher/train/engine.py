"""The DeepSpeed engine: its config (the JSON named by train.ds_config, filled from the YAML), the
bf16 cast ZeRO wants, and `deepspeed.initialize` with our optimizer and LR schedule."""
from __future__ import annotations

import json
import os

import torch

from notellm2 import find_shipped, shipped_root
from notellm2.launcher.config import ConfigError, RunConfig
from notellm2.launcher.train.optim import build_optimizer, build_scheduler, param_groups

# Keys of a DeepSpeed JSON that the launcher fills from the YAML; a JSON that sets them is refused.
LAUNCHER_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                 "gradient_clipping", "bf16", "fp16", "optimizer", "scheduler")


def build_ds_config(cfg: RunConfig, world_size: int, load_universal: bool = False) -> dict:
    """Read the DeepSpeed JSON named by train.ds_config and fill what comes from the YAML."""
    path = find_shipped(cfg.train.ds_config)
    if not os.path.isfile(path):
        raise ConfigError(f"train.ds_config: {cfg.train.ds_config} does not exist (looked in the working directory and {shipped_root()})")
    with open(path) as fh:
        try:
            ds = json.load(fh)
        except json.JSONDecodeError as e:
            raise ConfigError(f"train.ds_config: {path} is not valid JSON: {e}") from None
    ds = {k: v for k, v in ds.items() if not k.startswith("_")}
    for key in LAUNCHER_KEYS:
        if key in ds:
            raise ConfigError(f"train.ds_config: {path} sets {key!r}; batch sizes, clipping, precision and the "
                              "optimizer come from the YAML (data.pairs_per_rank, train.grad_accum_steps, "
                              "train.grad_clip, train.precision, train.lr_*): remove it from the JSON")
    ds["train_micro_batch_size_per_gpu"] = cfg.data.pairs_per_rank
    ds["gradient_accumulation_steps"] = cfg.train.grad_accum_steps
    ds["train_batch_size"] = cfg.data.pairs_per_rank * cfg.train.grad_accum_steps * world_size
    ds["gradient_clipping"] = cfg.train.grad_clip
    ds["bf16"] = {"enabled": cfg.train.precision == "bf16"}
    ds["fp16"] = {"enabled": False}
    ds.setdefault("zero_allow_untested_optimizer", True)
    if load_universal:
        ds.setdefault("checkpoint", {})["load_universal"] = True
    return ds


def cast_unpartitioned_to_bf16(model: torch.nn.Module) -> None:
    """The LLM comes partitioned in bf16 (HfDeepSpeedConfig); the new modules are built in fp32. ZeRO
    wants one dtype: cast what is not partitioned yet (DeepSpeed keeps fp32 master copies). The LLM's
    own float32 buffers (e.g. RoPE frequencies) keep the dtype transformers chose."""
    for p in model.parameters():
        if not hasattr(p, "ds_id") and p.dtype.is_floating_point:
            p.data = p.data.to(torch.bfloat16)
    for name, b in model.named_buffers():
        if b.dtype == torch.float32 and not name.startswith("llm."):
            b.data = b.data.to(torch.bfloat16)


def activation_dtype(cfg: RunConfig):
    """What the frozen vision tower's outputs are cast to before the engine sees them (None: keep fp32)."""
    return torch.bfloat16 if cfg.train.precision == "bf16" else None


def initialize(cfg: RunConfig, model: torch.nn.Module, ds_config: dict):
    """bf16 cast (bf16 runs), client AdamW over our param groups, LR schedule, `deepspeed.initialize`.
    Returns (engine, scheduler, the param groups' names in optimizer order)."""
    import deepspeed

    if cfg.train.precision == "bf16":
        cast_unpartitioned_to_bf16(model)
    groups = param_groups(model, cfg.train.lr_llm, cfg.train.lr_new, cfg.train.weight_decay)
    group_names = [g["name"] for g in groups]
    optimizer = build_optimizer(groups, ds_config)
    sched_fn = lambda opt: build_scheduler(opt, cfg.train.lr_schedule, cfg.train.warmup_steps,  # noqa: E731
                                           cfg.train.max_steps, cfg.train.min_lr_ratio)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=sched_fn,
                                                   config=ds_config, dist_init_required=False)
    return engine, scheduler, group_names


def learning_rates(engine, scheduler) -> list:
    """The current learning rate of each param group (in optimizer order)."""
    return scheduler.get_last_lr() if scheduler is not None else [g["lr"] for g in engine.optimizer.param_groups]
