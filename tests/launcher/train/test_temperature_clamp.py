"""The temperature bound is applied to the parameter after each optimizer step (notellm2.launcher.train.optim.clamp_temperature),
on 2 real ranks through deepspeed.initialize at ZeRO-3: a scale set above the bound is clamped in the fp32
master and in what the model's forward reads after every step, and with the gradient pushing it down it
comes back below the bound (the old clamp inside forward had zero gradient there)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from notellm2.launcher.train.optim import clamp_temperature, largest_at_most
from notellm2.modeling.config import LossConfig
from notellm2.modeling.loss import GatheredContrastiveLoss
from tests.helpers.multirank import run_ranks

MAX_SCALE = 30.0


class ScaleProbe(torch.nn.Module):
    """Fixed embeddings through a frozen-by-lr linear map into the real gathered loss."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(8))
            self.proj.bias.zero_()
        self.loss_fn = GatheredContrastiveLoss(LossConfig(init_scale=20.0, max_scale=MAX_SCALE))

    def forward(self, x, ids):
        emb = F.normalize(self.proj(x.to(self.proj.weight.dtype)).float(), dim=-1)
        return self.loss_fn(emb, ids)


def _inputs(rank: int, direction: str):
    """4 pairs per rank around one shared direction (hard negatives). up: each target is its query plus a
    little noise (a larger scale lowers the loss); down: each target mirrors its query around the shared
    direction (the positive is the least similar column, a larger scale raises the loss)."""
    g = torch.Generator().manual_seed(11 + rank)
    base = torch.ones(8)
    noise = torch.randn(4, 8, generator=g)
    q = base + 0.3 * noise
    t = q + 0.05 * torch.randn(4, 8, generator=g) if direction == "up" else base - 0.3 * noise
    ids = torch.cat([torch.arange(4) + 100 * (rank + 1), torch.arange(4) + 100 * (rank + 1) + 50])
    return torch.cat([q, t]), ids


def clamp_case(bf16: bool, persistence_threshold: int, stage: int = 3) -> dict:
    from notellm2.compat import skip_deepspeed_shm_build

    skip_deepspeed_shm_build()  # FACTS: skip the ~90 s shm compile
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = ScaleProbe()
    with torch.no_grad():
        model.loss_fn.log_scale.fill_(math.log(50.0))  # above the bound before the first step
    if bf16:
        model.to(torch.bfloat16)
    groups = [{"params": list(model.proj.parameters()), "lr": 0.0},
              {"params": [model.loss_fn.log_scale], "lr": 0.05}]
    ds_config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                 "train_batch_size": 4 * dist.get_world_size(),
                 "zero_optimization": ({"stage": 3, "stage3_param_persistence_threshold": persistence_threshold}
                                       if stage == 3 else {"stage": stage}),
                 "bf16": {"enabled": bf16}, "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(groups), config=ds_config)
    p = engine.module.loss_fn.log_scale
    lp_dtype = p.ds_tensor.dtype if stage == 3 else p.dtype
    steps = []
    for direction in ["up"] * 3 + ["down"] * 3:
        x, ids = _inputs(rank, direction)
        out = engine(x, ids)
        engine.backward(out["loss"])
        engine.step()
        before = safe_get_full_fp32_param(p).item()
        n = clamp_temperature(engine, MAX_SCALE)
        master = safe_get_full_fp32_param(p).item()
        with torch.no_grad():  # what the model uses now: the scale its next forward reads
            seen = engine(x, ids)["logit_scale"].item()
        steps.append({"direction": direction, "view_before_step": out["logit_scale"].item(), "master_before": before,
                      "master": master, "seen": seen, "clamped": n})
    return {"rank": rank, "lp_dtype": str(lp_dtype), "partitioned": getattr(p, "ds_persist", True) is False,
            "cap": largest_at_most(math.log(MAX_SCALE), lp_dtype), "steps": steps}


@pytest.mark.parametrize("bf16,persistence,stage", [(True, 0, 3), (False, 100000, 3), (True, 0, 2)],
                         ids=["bf16-partitioned", "fp32-persistent", "zero2-bf16"])
def test_temperature_is_clamped_after_each_step_and_can_come_back(bf16, persistence, stage):
    """ZeRO-2 takes the clamp's other branch (notellm2.compat.is_zero12_param: the fp32 master is set
    through safe_set_full_fp32_param); were it treated as a plain parameter, its master would stay above
    the bound and the `master <= cap` checks below would fail."""
    res = run_ranks("tests.launcher.train.test_temperature_clamp:clamp_case", nproc=2, timeout=180,
                    kwargs={"bf16": bf16, "persistence_threshold": persistence, "stage": stage},
                    env={"DS_ACCELERATOR": "cpu"})
    cap = math.log(MAX_SCALE)
    for rank in (0, 1):
        r = res.returns[rank]
        assert r["partitioned"] == (stage == 3 and persistence == 0), r
        assert r["cap"] <= cap and cap - r["cap"] < (0.02 if bf16 else 1e-6)
        steps = r["steps"]
        lp_dtype = getattr(torch, r["lp_dtype"].split(".")[-1])
        # The scale set above the bound is what the first forward used (forward does not clamp).
        assert steps[0]["view_before_step"] == pytest.approx(50.0, rel=0.01)
        for s in steps:
            # After every step the model reads the master in its own dtype (as DeepSpeed copies it), and
            # neither exceeds the bound. Right after a clamp the two are the same number (r["cap"]).
            assert s["master"] <= r["cap"] + 1e-7, s
            as_lp = torch.tensor(s["master"]).to(lp_dtype).item()
            assert s["seen"] == pytest.approx(math.exp(as_lp), rel=1e-6), s
            assert s["seen"] <= MAX_SCALE * (1 + 1e-6), s
        for s in steps[:3]:
            # The optimizer pushed it above the bound; the clamp brought it back to the bound exactly.
            assert s["master_before"] > r["cap"] and s["clamped"] == 1, s
            assert s["master"] == pytest.approx(r["cap"], abs=1e-7), s
        down = [s["master"] for s in steps[3:]]
        # With the gradient pushing down it comes back below the bound, and keeps going.
        assert down[0] < r["cap"] - 1e-3 and down[1] < down[0] and down[2] < down[1], steps
        assert all(s["clamped"] == 0 for s in steps[3:])
    assert res.returns[0]["steps"] == res.returns[1]["steps"]  # every rank sees the same temperature


def test_clamp_without_deepspeed_writes_the_parameter_in_place():
    model = ScaleProbe()
    with torch.no_grad():
        model.loss_fn.log_scale.fill_(math.log(50.0))
    assert clamp_temperature(model, MAX_SCALE) == 1
    assert model.loss_fn.log_scale.item() == largest_at_most(math.log(MAX_SCALE), torch.float32)
    assert model.loss_fn.scale().item() <= MAX_SCALE
    assert clamp_temperature(model, MAX_SCALE) == 0  # already within the bound: untouched
    frozen = GatheredContrastiveLoss(LossConfig(init_scale=20.0, max_scale=MAX_SCALE, learnable_temperature=False))
    with torch.no_grad():
        frozen.log_scale.fill_(math.log(50.0))
    assert clamp_temperature(frozen, MAX_SCALE) == 0  # a fixed temperature is left alone


def test_largest_at_most_rounds_towards_minus_infinity():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for x in (math.log(100.0), math.log(30.0), math.log(0.5), 0.0):
            v = largest_at_most(x, dtype)
            assert v <= x and torch.tensor(v, dtype=dtype).item() == v
            # The next representable value up is above x (v is the largest, not merely one below).
            t = torch.tensor(v, dtype=dtype)
            bits = torch.int32 if dtype == torch.float32 else torch.int16
            up = (t.view(bits) + (1 if v > 0 else -1)).view(dtype).item() if v != 0 else torch.finfo(dtype).tiny
            assert up > x
