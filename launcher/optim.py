"""Optimizer parameter groups and the learning-rate schedule.

Groups: {LLM, new modules} x {decayed, not decayed}. Norm weights, biases, the temperature
(logit scale) and the Q-Former query tokens get no weight decay. Everything in the note model
that is not under its `llm` attribute is a "new" module (connector, fusion gate, head, loss).
"""
from __future__ import annotations

import math

import torch

NO_DECAY_MARKERS = ("bias", "norm", "logit_scale", "temperature", "query_tokens", "ln_", "layernorm")


def is_no_decay(name: str, param: torch.nn.Parameter) -> bool:
    lname = name.lower()
    if any(m in lname for m in NO_DECAY_MARKERS):
        return True
    # 1-d parameters (norm gains, scales) are not decayed; ZeRO-3 keeps ds_shape for the true shape.
    shape = getattr(param, "ds_shape", None) or param.shape
    return len(shape) <= 1


def is_llm_param(name: str) -> bool:
    return name == "llm" or name.startswith("llm.")


def param_groups(model: torch.nn.Module, lr_llm: float, lr_new: float, weight_decay: float) -> list[dict]:
    groups = {key: [] for key in ("llm_decay", "llm_no_decay", "new_decay", "new_no_decay")}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = "llm" if is_llm_param(name) else "new"
        kind = "no_decay" if is_no_decay(name, p) else "decay"
        groups[f"{part}_{kind}"].append(p)
    out = []
    for key, params in groups.items():
        if not params:
            continue
        part, _, kind = key.partition("_")
        out.append({"params": params, "lr": lr_llm if part == "llm" else lr_new,
                    "weight_decay": weight_decay if kind == "decay" else 0.0, "name": key})
    if not out:
        raise ValueError("the model has no trainable parameters")
    return out


def build_optimizer(groups: list[dict], ds_config: dict, betas=(0.9, 0.999), eps=1e-8):
    """Client optimizer chosen from the DeepSpeed config: CPU offload -> DeepSpeedCPUAdam (compiled
    op), CUDA -> torch fused AdamW, CPU ranks -> plain torch AdamW (nothing compiled)."""
    zero = ds_config.get("zero_optimization", {})
    offload = (zero.get("offload_optimizer") or {}).get("device", "none") in ("cpu", "nvme")
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, betas=betas, eps=eps, adamw_mode=True)
    if torch.cuda.is_available():
        return torch.optim.AdamW(groups, betas=betas, eps=eps, fused=True)
    return torch.optim.AdamW(groups, betas=betas, eps=eps, foreach=False)


def lr_lambda(schedule: str, warmup_steps: int, max_steps: int, min_lr_ratio: float):
    """Multiplier of the base lr at optimizer step `s` (0-based): linear warm-up, then decay to min_lr_ratio."""

    def f(s: int) -> float:
        if warmup_steps > 0 and s < warmup_steps:
            return (s + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        span = max(1, max_steps - warmup_steps)
        progress = min(1.0, (s - warmup_steps) / span)
        if schedule == "linear":
            decay = 1.0 - progress
        else:  # cosine
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        return min_lr_ratio + (1.0 - min_lr_ratio) * decay

    return f


def build_scheduler(optimizer, schedule: str, warmup_steps: int, max_steps: int, min_lr_ratio: float):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(schedule, warmup_steps, max_steps, min_lr_ratio))
