"""Optimizer parameter groups and the learning-rate schedule.

Groups: {LLM, new modules} x {decayed, not decayed}. Norm weights, biases, the temperature
(the loss's log_scale) and the Q-Former query tokens get no weight decay (the paper-scale recipe's
weight decay of 1e-3 applies to the other weight matrices only). Everything in the note model
that is not under its `llm` attribute is a "new" module (connector, fusion gate, head, loss).
"""
from __future__ import annotations

import math

import torch

from notellm2 import compat

NO_DECAY_MARKERS = ("bias", "norm", "log_scale", "logit_scale", "temperature", "query_tokens", "ln_", "layernorm")


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


def temperature_params(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The learnable log logit scales (GatheredContrastiveLoss.log_scale) inside `module`."""
    from notellm2.modeling.loss import GatheredContrastiveLoss

    return [m.log_scale for m in module.modules()
            if isinstance(m, GatheredContrastiveLoss) and m.log_scale.requires_grad]


def largest_at_most(x: float, dtype: torch.dtype) -> float:
    """The largest number representable in `dtype` that is <= x (as a Python float)."""
    t = torch.tensor(x, dtype=torch.float64).to(dtype)
    if float(t) > x:
        bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}.get(dtype)
        if bits is None:
            return x
        # One step of the bit pattern towards -inf: down for positive numbers, up for negative ones.
        step = -1 if float(t) > 0 else 1
        t = (t.view(bits) + step).view(dtype)
    return float(t)


def clamp_temperature(engine, max_scale: float) -> int:
    """Keep every learnable temperature at log_scale <= log(max_scale); call it after each `engine.step()`.

    The loss uses exp(log_scale) unclamped, so the gradient stays alive above the bound and the
    scale can come back down; the bound is applied here, to the parameter itself. Under DeepSpeed the
    optimizer updates an fp32 master copy and later copies it into the low-precision parameter the
    model reads, so both are written:

    - ZeRO-3: the master is read with `safe_get_full_fp32_param` (an all-gather: every rank must call
      this) and written partition by partition with `safe_set_local_fp32_param`. In DeepSpeed 0.19.8
      `safe_set_full_fp32_param` cuts each rank's slice out of the unpadded value, which fails on a
      rank whose partition is all padding (a (1,)-shaped scale on 2 ranks). The set does not touch the
      lp partition (`ds_tensor`, copied from the master only at the next step, and all-gathered into a
      persistent parameter's full `data` after it), so both are written here too: the next forward
      already sees the clamped value.
    - ZeRO-1/2 and the bf16 optimizer: `safe_set_full_fp32_param` and the replicated `param.data`.
    - No DeepSpeed optimizer (plain modules, tests): `param.data` in place.

    The bound written is the largest value of the parameter's own dtype that is <= log(max_scale)
    (bf16 rounds log(30) = 3.4012 up to 3.4062, a scale of 30.2): master and model then hold the same
    number and the scale the model uses never exceeds max_scale.

    Returns how many parameters were clamped (the same on every rank). A step that DeepSpeed skipped
    (gradient accumulation micro-step, overflow) changed nothing: then this returns 0 at once.
    """
    import deepspeed.comm as ds_comm
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param, safe_set_local_fp32_param

    log_cap = math.log(float(max_scale))
    was_applied = getattr(engine, "was_step_applied", None)
    if callable(was_applied) and not was_applied():
        return 0
    module = getattr(engine, "module", engine)
    clamped = 0
    for p in temperature_params(module):
        if hasattr(p, "ds_id"):  # ZeRO-3
            part = p.ds_tensor
            if getattr(part, "final_location", None) == "nvme":
                raise NotImplementedError("clamp_temperature: the temperature's partition is swapped to NVMe "
                                          "(offload_param.device nvme); keep small parameters in memory")
            cap = largest_at_most(log_cap, part.dtype)
            full = safe_get_full_fp32_param(p)
            if full is None or not bool((full > cap).any()):
                continue
            value = full.clamp(max=cap).flatten()
            size = part.numel()
            rank = ds_comm.get_rank(group=p.ds_process_group)
            padded = torch.zeros(size * ds_comm.get_world_size(group=p.ds_process_group),
                                 dtype=value.dtype, device=value.device)
            padded[:value.numel()] = value
            local = padded.narrow(0, size * rank, size)
            safe_set_local_fp32_param(p, local)
            part.data.copy_(local.to(device=part.device, dtype=part.dtype))
            if p.data.numel() == p.ds_numel:  # available in full (persistent): what forward reads
                p.data.copy_(value.view(p.ds_shape).to(device=p.device, dtype=p.dtype))
        elif compat.is_zero12_param(p):  # ZeRO-1/2: an fp32 master copy
            cap = largest_at_most(log_cap, p.dtype)
            full = safe_get_full_fp32_param(p)
            if full is None or not bool((full > cap).any()):
                continue
            value = full.clamp(max=cap)
            safe_set_full_fp32_param(p, value)
            p.data.copy_(value.view_as(p.data).to(p.dtype))
        else:
            cap = largest_at_most(log_cap, p.dtype)
            if not bool((p.data > cap).any()):
                continue
            with torch.no_grad():
                p.data.clamp_(max=cap)
        clamped += 1
    return clamped
