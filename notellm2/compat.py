"""Every private attribute of DeepSpeed, torch and transformers that this stack touches, in one place.

A private attribute can vanish or change meaning in any release, silently. So nothing outside this
module names one; each use below says what it relies on and why no public way serves, and
tests/test_compat.py checks each against the installed versions: when one disappears or changes
meaning, a test fails naming the attribute and the version it was written for (`PINNED`, the pins of
requirements.txt). Checked public alternatives are recorded beside each use.

Imports of deepspeed, torch and transformers happen inside the functions: `notellm2.modeling` uses
this module and must not import deepspeed.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Any, Optional

# The versions every use below was written and tested against (requirements.txt, scripts/setup.sh).
PINNED = {"deepspeed": "0.19.8", "torch": "2.13.0", "transformers": "5.23.0"}


class CompatError(RuntimeError):
    """A private attribute this stack relies on is missing or does not mean what it did."""


def _fail(package: str, attribute: str, what: str) -> CompatError:
    try:
        installed = __import__(package).__version__
    except Exception:  # noqa: BLE001 - the message is what matters here
        installed = "?"
    return CompatError(f"{attribute}: {what} (written for {package} {PINNED[package]}, installed {installed}); "
                       "see notellm2/compat.py")


# ----------------------------------------------------------------------------- torch

def default_store():
    """The process group's TCPStore (`torch.distributed.distributed_c10d._get_default_store`).

    The watchdog publishes heartbeats through the same store the ranks rendezvoused on, so a dead rank is
    seen without a second server. Public alternative checked: none in torch 2.13 returns the default
    group's store (`init_process_group` takes a store but does not give it back)."""
    import torch.distributed as dist

    getter = getattr(dist.distributed_c10d, "_get_default_store", None)
    if getter is None:
        raise _fail("torch", "torch.distributed.distributed_c10d._get_default_store", "missing")
    return getter()


def numpy_array_globals() -> list:
    """The numpy types a pickled numpy array needs under `torch.load(weights_only=True)`: what the rank
    files of checkpoints before format 2 hold (numpy's RNG state: a uint32 array). numpy's private
    `_reconstruct` (moved from `numpy.core` to `numpy._core` in numpy 2) is the function an ndarray
    pickles with. Public alternative checked: none; torch's own allow-list leaves numpy out."""
    import numpy as np

    multiarray = getattr(getattr(np, "_core", None), "multiarray", None) or np.core.multiarray
    reconstruct = getattr(multiarray, "_reconstruct", None)
    if reconstruct is None:
        raise CompatError("numpy multiarray._reconstruct: missing (see notellm2/compat.py)")
    return [reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


# ----------------------------------------------------------------------------- deepspeed

# The classes DeepSpeed pickles into its checkpoints besides tensors and builtins, found by saving real
# ones with deepspeed 0.19.8 (ZeRO-3 fp32 and bf16, ZeRO-2 bf16, and their universal conversion) and
# listing them with torch.serialization.get_unsafe_globals_in_checkpoint (tests/test_compat.py does it again).
DEEPSPEED_CHECKPOINT_CLASSES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",  # optimizer states: the (static) loss scaler
    "deepspeed.runtime.zero.config.ZeroStageEnum",  # optimizer states: the ZeRO stage
    "deepspeed.utils.tensor_fragment.fragment_address",  # ZeRO-1/2 optimizer states: fp32 fragment offsets
)


def deepspeed_checkpoint_globals() -> list:
    """The classes of DEEPSPEED_CHECKPOINT_CLASSES, imported: the allow-list with which the stack opens each
    DeepSpeed `.pt` file (`torch.load(weights_only=True)`) before DeepSpeed unpickles it without limits
    (launcher/train/checkpoint.py `check_files`). These are internal module paths of DeepSpeed; a release
    that moves one fails here, naming it. Public alternative checked: none (DeepSpeed 0.19.8 loads its
    own files with `weights_only=False` and publishes no list of what they hold)."""
    import importlib

    out = []
    for dotted in DEEPSPEED_CHECKPOINT_CLASSES:
        module, _, name = dotted.rpartition(".")
        try:
            out.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            raise _fail("deepspeed", dotted, "missing") from None
    return out


def skip_deepspeed_shm_build() -> None:
    """Replace `deepspeed.comm.torch.build_shm_op` with a no-op before `deepspeed.init_distributed`.

    DeepSpeed compiles a shared-memory all-reduce op there (about 90 s on these CPUs) that only serves
    inference; FACTS.md measured identical losses without it. Public alternative checked: none (no
    config key or environment variable in deepspeed 0.19.8 skips it)."""
    import deepspeed.comm.torch  # noqa: F401  (makes sure the module is in sys.modules)

    module = sys.modules["deepspeed.comm.torch"]
    if not callable(getattr(module, "build_shm_op", None)):
        raise _fail("deepspeed", "deepspeed.comm.torch.build_shm_op", "missing or not a function")
    module.build_shm_op = lambda: None


def zero3_param_coordinator(engine) -> Optional[Any]:
    """The ZeRO-3 parameter coordinator of `engine` (the object that traces module order and prefetches
    partitioned parameters), or None for an engine without ZeRO-3 parameter offload."""
    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
    return offload.get_param_coordinator() if offload is not None else None


@contextlib.contextmanager
def one_zero3_trace_step(engine):
    """Within the block, only the first forward of the root module starts a new step of ZeRO-3's module
    trace: the coordinator's `reset_step`, which the root module's forward pre-hook looks up on the
    instance, is shadowed by an instance attribute that calls the real one once.

    Why: chunked caching runs 2n forwards per batch; with a new trace step at each, the trace never
    repeats and every module re-gathers its parameters in every chunk (launcher/train/chunked.py).
    Public alternative checked: none in deepspeed 0.19.8 (the trace is internal to the coordinator).
    A no-op for an engine without a ZeRO-3 coordinator."""
    coordinator = zero3_param_coordinator(engine)
    if coordinator is None:
        yield
        return
    if not callable(getattr(type(coordinator), "reset_step", None)):
        raise _fail("deepspeed", "PartitionedParameterCoordinator.reset_step", "missing")
    real = coordinator.reset_step
    calls = [0]

    def first_only():
        calls[0] += 1
        if calls[0] == 1:
            real()

    coordinator.reset_step = first_only
    try:
        yield
    finally:
        del coordinator.reset_step  # back to the class's method


@contextlib.contextmanager
def manual_accumulation_boundaries(engine):
    """Let the caller set the gradient-accumulation boundary per backward inside the block
    (`engine.set_gradient_accumulation_boundary`, public); on exit the engine goes back to counting
    micro-steps itself.

    Going back: the engine's flag `_is_gradient_accumulation_boundary` is None in counting mode and a
    bool once set; the public setter takes a bool, so the saved value is written back directly.
    Public alternatives checked: `engine.no_sync()` asserts against ZeRO-2/3 (gradient partitioning);
    `engine.coalesce_grad_reduction()` flushes once per block and overwrites the averaged gradients at
    each exit, so with train.grad_accum_steps > 1 only the last micro-batch would reach the step."""
    if not hasattr(engine, "_is_gradient_accumulation_boundary"):
        raise _fail("deepspeed", "DeepSpeedEngine._is_gradient_accumulation_boundary", "missing")
    saved = engine._is_gradient_accumulation_boundary
    at_boundary = engine.is_gradient_accumulation_boundary()
    try:
        yield at_boundary
    finally:
        engine.set_gradient_accumulation_boundary(at_boundary)  # the optimizer's copy, as the engine had it
        engine._is_gradient_accumulation_boundary = saved


def is_zero12_param(param) -> bool:
    """Whether `param` belongs to a ZeRO-1/2 optimizer that keeps an fp32 master copy (its high-precision
    mapping `_hp_mapping`, which `deepspeed.utils.safe_get_full_fp32_param` reads). ZeRO-3 parameters
    are told apart by their public `ds_id`. Public alternative checked: `safe_get_full_fp32_param`
    returns None for a plain parameter and for a ZeRO-2 one before the optimizer links it, so it cannot
    tell the two apart."""
    return hasattr(param, "_hp_mapping")


def optimizer_state_tensors(engine) -> dict:
    """The tensors of the state a live engine's optimizer holds on this rank, by kind: 'master' (fp32
    partitions), 'grads' (gradient partitions), 'optimizer' (Adam moments). For `notellm2 plan`'s
    comparison of planned and held bytes; reads the ZeRO optimizers' own buffers, which no public API
    lists (public alternative checked: `deepspeed.runtime.utils.see_memory_usage` prints process-wide
    allocator figures only)."""
    import torch

    opt = engine.optimizer
    out = {"master": [], "grads": [], "optimizer": []}
    for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):  # ZeRO-3, ZeRO-1/2
        out["master"] += [t for t in (getattr(opt, name, None) or []) if torch.is_tensor(t)]
    flat = getattr(opt, "grad_partitions_flat_buffer", None)  # ZeRO-3
    if torch.is_tensor(flat):
        out["grads"].append(flat)
    else:
        averaged = getattr(opt, "averaged_gradients", {}) or {}  # ZeRO-1/2
        for group in averaged:
            value = averaged[group]
            out["grads"] += [t for t in (value if isinstance(value, list) else [value]) if torch.is_tensor(t)]
    inner = getattr(opt, "optimizer", opt)
    for st in inner.state.values():
        out["optimizer"] += [v for v in st.values() if torch.is_tensor(v) and v.dim() > 0]
    return out


# ----------------------------------------------------------------------------- transformers

def _hf_deepspeed_module():
    """transformers' DeepSpeed integration, or None when it was never imported: only then can a training
    HfDeepSpeedConfig be alive (the launcher imports it), and importing it here would pull deepspeed."""
    return sys.modules.get("transformers.integrations.deepspeed")


@contextlib.contextmanager
def without_hf_zero3():
    """Build and load plain (unpartitioned) modules even while the launcher's HfDeepSpeedConfig is alive.

    transformers partitions every `from_pretrained` and `from_config` under an active ZeRO-3
    HfDeepSpeedConfig, which it holds as a weak reference `_hf_deepspeed_config_weak_ref`. The frozen
    tower lives outside the engine (its partitioned weights would never be gathered) and the export
    builds a plain model, so both step out of it: the held config is read through the weak reference,
    unset with the public `unset_hf_deepspeed_config`, and set again with `set_hf_deepspeed_config`.
    Public alternative checked: `deepspeed_config()` returns the config dict, not the object that
    `set_hf_deepspeed_config` needs to restore it."""
    hf_ds = _hf_deepspeed_module()
    if hf_ds is None:
        yield
        return
    if not hasattr(hf_ds, "_hf_deepspeed_config_weak_ref"):
        raise _fail("transformers", "transformers.integrations.deepspeed._hf_deepspeed_config_weak_ref", "missing")
    ref = hf_ds._hf_deepspeed_config_weak_ref
    held = ref() if ref is not None else None
    if held is None:
        yield
        return
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_ds.set_hf_deepspeed_config(held)


def blip2_qformer_attention_class():
    """BLIP-2's Q-Former attention module class (an internal module of transformers). The connector keys
    its attention-probability dropout: it gives each such module an `attn_dropout` (a keyed nn.Dropout),
    registers an eager attention function that applies `module.attn_dropout` where transformers' eager
    BLIP-2 attention applies its dropout, and selects it with the public `set_attn_implementation`
    (the private `config._attn_implementation` field it used to write is no longer touched).
    tests/test_compat.py checks that the class still exists and that transformers still calls the
    registered function, with the module and a dropout rate, for every Q-Former attention."""
    try:
        from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerMultiHeadAttention
    except ImportError:
        raise _fail("transformers", "transformers.models.blip_2.modeling_blip_2.Blip2QFormerMultiHeadAttention",
                    "missing") from None
    return Blip2QFormerMultiHeadAttention
