"""Each private attribute of DeepSpeed, torch and transformers that notellm2/compat.py touches, checked
against the installed versions for presence and for the meaning the stack relies on. A failure names
the attribute and the version it was written for (compat.PINNED), so a version bump that moves one
fails here, loudly, instead of training wrong."""
from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest

from notellm2 import compat
from tests.helpers.multirank import run_ranks
from tests.helpers.paths import REPO


def _where(package: str, attribute: str) -> str:
    return f"{attribute} (notellm2.compat was written for {package} {compat.PINNED[package]})"


def test_pins_match_the_requirements():
    with open(os.path.join(REPO, "requirements.txt")) as fh:
        pins = dict(line.split("#")[0].strip().split("==") for line in fh if "==" in line.split("#")[0])
    assert pins["deepspeed"] == compat.PINNED["deepspeed"] and pins["transformers"] == compat.PINNED["transformers"]
    with open(os.path.join(REPO, "scripts", "setup.sh")) as fh:
        assert f'TORCH_PIN="torch=={compat.PINNED["torch"]}"' in fh.read()


def test_default_store_is_the_process_groups_store():
    """torch.distributed.distributed_c10d._get_default_store: a key set through rank 0's is read through
    rank 1's (the store the ranks rendezvoused on, which the watchdog's heartbeats rely on)."""
    res = run_ranks("tests.helpers.compat_cases:default_store_is_shared", nproc=2, timeout=120, check=False)
    where = _where("torch", "torch.distributed.distributed_c10d._get_default_store")
    assert res.returncode == 0, where + "\n" + res.describe()
    assert res.returns == {0: "seen by every rank", 1: "seen by every rank"}, where


def test_the_shm_builder_is_what_deepspeed_init_calls():
    """deepspeed.comm.torch.build_shm_op: the TorchBackend's constructor calls the module-level function
    (so replacing it skips the compile), and after the patch it returns without building."""
    import deepspeed.comm.torch  # noqa: F401  (`deepspeed.comm.torch` as an attribute is torch itself)

    ds_torch = sys.modules["deepspeed.comm.torch"]
    where = _where("deepspeed", "deepspeed.comm.torch.build_shm_op")
    assert callable(getattr(ds_torch, "build_shm_op", None)), where
    assert "build_shm_op()" in inspect.getsource(ds_torch.TorchBackend.__init__), where
    saved = ds_torch.build_shm_op
    try:
        compat.skip_deepspeed_shm_build()
        assert ds_torch.build_shm_op() is None, where
    finally:
        ds_torch.build_shm_op = saved


@pytest.fixture(scope="module")
def engines():
    res = run_ranks("tests.helpers.compat_cases:deepspeed_internals", nproc=1, timeout=240, env={"DS_ACCELERATOR": "cpu"})
    return res.returns[0]


def test_zero3_trace_step_patch(engines):
    where = _where("deepspeed", "PartitionedParameterCoordinator.reset_step (root forward pre-hook)")
    assert engines["coordinator"] == "PartitionedParameterCoordinator", where
    assert engines["reset_calls_plain"] == 3, where  # one trace step per root forward ...
    assert engines["reset_calls_patched"] == 1, where  # ... and one in all inside the block
    assert engines["patch_removed"], where


def test_accumulation_boundary_flag(engines):
    """DeepSpeedEngine._is_gradient_accumulation_boundary: None while the engine counts micro-steps; after
    a manual block the engine counts again (gas 2: boundaries at micro-steps 1 and 3)."""
    where = _where("deepspeed", "DeepSpeedEngine._is_gradient_accumulation_boundary")
    assert engines["z2_flag_initially"] == "None" and engines["z2_flag_after"] == "None", where
    assert engines["z2_at_boundary_in_block"] is True, where
    assert engines["z2_boundaries"] == [["auto", False], ["manual", False], ["auto", True], ["auto", False],
                                        ["auto", True]], where


def test_zero2_parameters_are_told_apart(engines):
    """`_hp_mapping`: every ZeRO-2 parameter has it (and its fp32 master through the public reader),
    no ZeRO-3 parameter does."""
    where = _where("deepspeed", "parameter._hp_mapping")
    assert engines["z2_is_zero12"] and engines["z2_master_matches"], where
    assert not engines["z3_is_zero12"], where


def test_optimizer_state_buffers(engines):
    """The ZeRO optimizers' own buffers that `notellm2 plan` sums: fp32 master and Adam's two moments the
    size of the (1-rank) parameters, and a gradient partition."""
    for stage in ("z3", "z2"):
        where = _where("deepspeed", f"{stage} optimizer buffers (fp32_partitioned_groups_flat / "
                                    "single_partition_of_fp32_groups, grad_partitions_flat_buffer / averaged_gradients)")
        state, numel = engines[f"{stage}_state"], engines[f"{stage}_numel"]
        assert state["master"] >= numel and state["optimizer"] == 2 * state["master"], (where, state, numel)
        assert state["grads"] >= numel, (where, state, numel)


def test_the_checkpoint_allow_list_is_what_deepspeed_writes(engines):
    """DEEPSPEED_CHECKPOINT_CLASSES: the classes real ZeRO-3 (fp32) and ZeRO-2 (bf16) checkpoints of
    this DeepSpeed pickle besides torch's own allow-list are exactly the listed ones (none missing, none
    stale), each imports, and the stack's check opens both checkpoints with them."""
    where = _where("deepspeed", "the classes in DeepSpeed's checkpoint files (compat.DEEPSPEED_CHECKPOINT_CLASSES)")
    found = set()
    for stage in ("z3", "z2"):
        saved = engines[f"{stage}_checkpoint"]
        assert saved["files"] and saved["refused"] is None, (where, stage, saved)
        found |= {g for names in saved["files"].values() for g in names}
    assert found == set(compat.DEEPSPEED_CHECKPOINT_CLASSES), (where, sorted(found))
    classes = compat.deepspeed_checkpoint_globals()
    assert [f"{c.__module__}.{c.__qualname__}" for c in classes] == list(compat.DEEPSPEED_CHECKPOINT_CLASSES), where


def test_numpy_arrays_open_with_their_allow_list(tmp_path):
    """numpy's `_reconstruct`: a pickled numpy RNG state (what rank files before checkpoint format 2 hold)
    opens with `weights_only=True` given compat.numpy_array_globals, and not without it."""
    import pickle

    import numpy as np
    import torch

    path = str(tmp_path / "state.pt")
    torch.save({"numpy": np.random.RandomState(3).get_state()}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    with torch.serialization.safe_globals(compat.numpy_array_globals()):
        state = torch.load(path, weights_only=True)
    assert state["numpy"][0] == "MT19937" and np.array_equal(state["numpy"][1], np.random.RandomState(3).get_state()[1])


def test_hf_zero3_config_can_be_stepped_out_of():
    """transformers.integrations.deepspeed._hf_deepspeed_config_weak_ref: while an HfDeepSpeedConfig of
    ZeRO-3 is alive, transformers reports ZeRO-3 on; inside `without_hf_zero3` it reports it off; after,
    on again, with the same object."""
    code = (
        "from transformers.integrations import HfDeepSpeedConfig\n"
        "from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, deepspeed_config\n"
        "from notellm2 import compat\n"
        "held = HfDeepSpeedConfig({'zero_optimization': {'stage': 3}, 'train_micro_batch_size_per_gpu': 1})\n"
        "before = is_deepspeed_zero3_enabled()\n"
        "with compat.without_hf_zero3():\n"
        "    inside = is_deepspeed_zero3_enabled()\n"
        "after = is_deepspeed_zero3_enabled() and deepspeed_config() is held.config\n"
        "print(before, inside, after)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=REPO))
    assert out.returncode == 0 and out.stdout.split() == ["True", "False", "True"], \
        _where("transformers", "transformers.integrations.deepspeed._hf_deepspeed_config_weak_ref") + out.stderr[-2000:]


def test_the_qformer_attention_goes_through_the_keyed_function():
    """BLIP-2 internals: the Q-Former attention class exists, and with keyed dropout on, transformers calls
    the registered attention function for each of its attention modules with the module and a dropout
    rate > 0 in training (so `module.attn_dropout` is applied), and with 0 in eval."""
    import torch
    from transformers import AttentionInterface

    from notellm2.modeling import connector
    from notellm2.modeling.config import ConnectorConfig

    where = _where("transformers", "Blip2QFormerMultiHeadAttention and the Q-Former's attention dispatch")
    cls = compat.blip2_qformer_attention_class()
    calls = []
    real = connector._keyed_eager_attention

    def spy(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        calls.append((type(module), dropout, isinstance(getattr(module, "attn_dropout", None), connector.KeyedDropout)))
        return real(module, query, key, value, attention_mask, scaling, dropout=dropout, **kwargs)

    torch.manual_seed(0)
    conn = connector.QFormerConnector(ConnectorConfig(kind="qformer", num_query_tokens=4, num_layers=2, hidden_size=32,
                                                      num_heads=2, dropout=0.1), token_dim=16, llm_dim=24,
                                      num_vision_tokens=5)
    AttentionInterface.register(connector.KEYED_ATTENTION, spy)
    try:
        conn.train()
        conn(torch.randn(3, 5, 16))
        n_modules = sum(isinstance(m, cls) for m in conn.qformer.modules())
        assert n_modules >= 3 and len(calls) == n_modules, (where, len(calls), n_modules)
        assert all(c == (cls, pytest.approx(0.1), True) for c in calls), (where, calls)
        calls.clear()
        conn.eval()
        conn(torch.randn(3, 5, 16))
        assert len(calls) == n_modules and all(c[1] == 0 for c in calls), (where, calls)
    finally:
        AttentionInterface.register(connector.KEYED_ATTENTION, real)
