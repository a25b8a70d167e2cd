"""Rank functions of tests/test_compat.py: real DeepSpeed engines (1 CPU rank, gloo) on which each
private attribute that notellm2.compat touches is checked for presence and meaning."""
from __future__ import annotations

import torch


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 8)
        self.b = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))).pow(2).mean()


def _engine(stage: int, gas: int = 1, bf16: bool = False):
    import deepspeed

    torch.manual_seed(0)
    model = _Tiny()
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": gas, "train_batch_size": 2 * gas,
           "zero_optimization": {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})},
           "bf16": {"enabled": bf16}, "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9}
    if bf16:
        model.to(torch.bfloat16)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3), config=cfg)
    return engine


def _step(engine, n: int = 1):
    dtype = next(engine.module.parameters()).dtype
    for _ in range(n):
        loss = engine(torch.randn(2, 8, dtype=dtype))
        engine.backward(loss)
        engine.step()


def _checkpoint_globals(engine, root: str, tag: str) -> dict:
    """Save `engine` as checkpoint `tag` under `root`, then: {file: the globals beyond torch's own allow-list
    it needs (torch.serialization.get_unsafe_globals_in_checkpoint)}, and the stack's verdict on the
    folder (notellm2's check_files: None when every file opens with the allow-list)."""
    import glob
    import os

    from torch.serialization import get_unsafe_globals_in_checkpoint

    from notellm2.launcher.train.checkpoint import CheckpointError, check_files

    engine.save_checkpoint(root, tag=tag, save_latest=False)
    folder = os.path.join(root, tag)
    found = {os.path.basename(f): sorted(get_unsafe_globals_in_checkpoint(f))
             for f in sorted(glob.glob(os.path.join(folder, "*.pt")))}
    try:
        check_files(folder, None)
        verdict = None
    except CheckpointError as e:
        verdict = str(e)
    return {"files": found, "refused": verdict}


def deepspeed_internals() -> dict:
    import shutil
    import tempfile

    import deepspeed

    from notellm2 import compat

    compat.skip_deepspeed_shm_build()
    deepspeed.init_distributed(dist_backend="gloo")
    out = {}

    # ZeRO-3: the coordinator, its reset_step, and the one-trace-step patch
    z3 = _engine(3)
    coordinator = compat.zero3_param_coordinator(z3)
    out["coordinator"] = type(coordinator).__name__ if coordinator is not None else None
    calls = []
    real = type(coordinator).reset_step

    def counting(self):
        calls.append(1)
        return real(self)

    type(coordinator).reset_step = counting
    try:
        x = torch.randn(2, 8)
        for _ in range(3):
            z3(x)
        out["reset_calls_plain"] = len(calls)
        calls.clear()
        with compat.one_zero3_trace_step(z3):
            for _ in range(3):
                z3(x)
        out["reset_calls_patched"] = len(calls)
        out["patch_removed"] = "reset_step" not in vars(coordinator)
    finally:
        type(coordinator).reset_step = real
    _step(z3)
    held = compat.optimizer_state_tensors(z3)
    out["z3_state"] = {k: sum(t.numel() for t in v) for k, v in held.items()}
    out["z3_numel"] = sum(p.ds_numel for p in z3.module.parameters())
    out["z3_is_zero12"] = any(compat.is_zero12_param(p) for p in z3.module.parameters())
    checkpoints = tempfile.mkdtemp(prefix="compat-checkpoints-")
    out["z3_checkpoint"] = _checkpoint_globals(z3, checkpoints, "z3")

    # ZeRO-2 (bf16, an fp32 master): the hp mapping and the boundary flag
    z2 = _engine(2, gas=2, bf16=True)
    params = list(z2.module.parameters())
    from deepspeed.utils import safe_get_full_fp32_param

    out["z2_is_zero12"] = all(compat.is_zero12_param(p) for p in params)
    out["z2_master_matches"] = all(safe_get_full_fp32_param(p) is not None and
                                   torch.equal(safe_get_full_fp32_param(p).to(p.dtype), p.data) for p in params)
    out["z2_flag_initially"] = repr(z2._is_gradient_accumulation_boundary)
    seen = []
    for micro in range(4):
        if micro == 1:
            with compat.manual_accumulation_boundaries(z2) as at_boundary:
                out["z2_at_boundary_in_block"] = at_boundary
                z2.set_gradient_accumulation_boundary(False)
                seen.append(("manual", z2.is_gradient_accumulation_boundary()))
        seen.append(("auto", z2.is_gradient_accumulation_boundary()))
        loss = z2(torch.randn(2, 8, dtype=torch.bfloat16))
        z2.backward(loss)
        if micro == 3:  # ZeRO-1/2 hold their gradient partition from the boundary's backward to the step
            held = compat.optimizer_state_tensors(z2)
            out["z2_state"] = {k: sum(t.numel() for t in v) for k, v in held.items()}
        z2.step()
    out["z2_boundaries"] = seen
    out["z2_flag_after"] = repr(z2._is_gradient_accumulation_boundary)
    out["z2_numel"] = sum(p.numel() for p in params)
    out["z2_checkpoint"] = _checkpoint_globals(z2, checkpoints, "z2")
    shutil.rmtree(checkpoints, ignore_errors=True)
    return out


def default_store_is_shared() -> str:
    """Rank 0 sets a key through compat.default_store(); every rank reads it back through its own."""
    import torch.distributed as dist

    from notellm2 import compat

    store = compat.default_store()
    if dist.get_rank() == 0:
        store.set("compat-probe", "seen by every rank")
    dist.barrier()
    return store.get("compat-probe").decode()
