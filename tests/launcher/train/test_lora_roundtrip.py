"""LoRA through the real training loop on 2 CPU ranks (ZeRO-3, fp32, chunks of 2 pairs, LoRA dropout 0.1;
tiny Llama + tiny CLIP + real shards), issue #29 items 2 and 3:

- the adapters saved in a step's checkpoint equal the live ones gathered from their partitions at that
  step, and they are neither zero nor their initial values;
- `notellm2 export` merges them into the LLM: the export holds a plain LLM, the serving encoder loads it
  unchanged, and its reference vectors match the live (unmerged, partitioned) model's to 1e-5;
- killed with SIGKILL at the start of step 3 and resumed, a run logs the same per-step losses and
  gradient norms as the unbroken one;
- resumed on 1 rank (another world size, through DeepSpeed's universal checkpoint) it loads the same
  adapters;
- a checkpoint without adapters does not resume a LoRA run, nor one with adapters a full fine-tune (one line)."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from notellm2.launcher.train import checkpoint as ckpt
from tests.helpers.multirank import run_command, run_ranks
from tests.helpers.real_setup import build_inputs, write_config
from tests.helpers.runs import assert_same_steps, kill_and_resume

pytestmark = pytest.mark.slow

LORA = ["model.llm.lora.enabled=true", "model.llm.lora.rank=4", "model.llm.lora.dropout=0.1"]
CASES = "tests.launcher.train.lora_cases:watched_training"


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora-roundtrip")
    inputs = build_inputs(str(tmp / "inputs"))
    run_dir, out, export_dir = str(tmp / "ref"), str(tmp / "ref-out"), str(tmp / "export")
    os.makedirs(out)
    cfg = write_config(str(tmp / "ref.yaml"), inputs, run_dir, chunk_pairs=2, precision="fp32")
    r = run_ranks(CASES, nproc=2, timeout=600, kwargs={"config": cfg, "out_dir": out, "overrides": LORA,
                                                       "export_dir": export_dir})
    assert r.returns[0]["step"] == 4
    # every module the engine trains is in training mode from the first step (dropout on, activation
    # checkpointing on): transformers loads the LLM in eval mode, and until the fix it stayed so
    assert all(names == [] for names in r.returns[0]["in_eval_mode"].values()), r.returns[0]["in_eval_mode"]
    return {"tmp": tmp, "inputs": inputs, "run_dir": run_dir, "out": out, "export": export_dir, "config": cfg}


def _adapters(state: dict) -> dict:
    return {k: v for k, v in state.items() if ".lora_" in k or k.endswith(".rows")}


def test_checkpointed_adapters_equal_the_live_ones_and_have_trained(ref):
    from notellm2.launcher.export import consolidate

    initial = torch.load(os.path.join(ref["out"], "initial.pt"))
    assert any(".lora_A." in k for k in initial) and any(k.endswith(".rows") for k in initial)
    for step in (2, 4):
        live = torch.load(os.path.join(ref["out"], f"live_{step}.pt"))
        saved = _adapters(consolidate(os.path.join(ckpt.checkpoint_root(ref["run_dir"]), ckpt.step_name(step))))
        assert sorted(saved) == sorted(live) == sorted(initial)
        for name in live:
            assert torch.equal(saved[name], live[name]), name      # saved = live, bit for bit (fp32)
            assert saved[name].abs().max() > 0, name                # not empty, not zero (B starts at zero)
            assert (saved[name] - initial[name]).abs().max() > 0, name  # not re-initialised: trained


def test_export_merges_into_a_plain_llm_whose_vectors_match_the_live_model(ref):
    from safetensors.torch import load_file

    from notellm2.modeling.pretrained import NoteEncoder

    weights = load_file(os.path.join(ref["export"], "model.safetensors"))
    assert not [k for k in weights if ".lora_" in k or ".base_layer." in k or k.endswith(".rows")]
    assert "llm.layers.0.self_attn.q_proj.weight" in weights and "llm.embed_tokens.weight" in weights
    stored = np.load(os.path.join(ref["export"], "reference_embeddings.npz"))
    live = np.load(os.path.join(ref["out"], "live_vectors.npz"))
    assert sorted(stored.files) == sorted(live.files) == ["both", "image", "text"]
    for mode in live.files:
        gap = float(np.abs(stored[mode] - live[mode]).max())
        print(f"{mode}: export vs live model max |diff| {gap:.2e}")
        assert gap <= 1e-5, (mode, gap)
    encoder = NoteEncoder.from_pretrained(ref["export"])  # the serving encoder, unchanged: a plain LLM
    assert not any(".lora_" in n for n, _ in encoder.note_model.named_parameters())
    assert max(encoder.reference_gap().values()) <= 1e-5


def test_killed_and_resumed_run_logs_the_same_losses(ref):
    run_dir = str(ref["tmp"] / "killed")
    cfg = write_config(str(ref["tmp"] / "killed.yaml"), ref["inputs"], run_dir, chunk_pairs=2, precision="fp32")
    kill_and_resume(cfg, run_dir, LORA)
    assert_same_steps(ref["run_dir"], run_dir, 4)


def test_resume_on_another_world_size_loads_the_adapters(ref):
    run_dir, out = str(ref["tmp"] / "one-rank"), str(ref["tmp"] / "one-rank-out")
    shutil.copytree(ref["run_dir"], run_dir)
    os.makedirs(out)
    r = run_ranks(CASES, nproc=1, timeout=400, kwargs={"config": ref["config"], "out_dir": out,
                                                       "overrides": [*LORA, f"train.output_dir={run_dir}"]})
    assert "through a universal checkpoint (world size 2 -> 1)" in r.output
    loaded, live = torch.load(os.path.join(out, "final.pt")), torch.load(os.path.join(ref["out"], "live_4.pt"))
    assert sorted(loaded) == sorted(live)
    for name in live:
        assert torch.equal(loaded[name], live[name]), name


def test_checkpoint_without_adapters_is_refused_in_one_line(ref):
    from notellm2.errors import UserError
    from notellm2.launcher.config import load_config

    # a real checkpoint of a full fine-tune (1 rank, 1 step), resumed with LoRA even past the config hash
    plain_dir = str(ref["tmp"] / "plain")
    cfg = write_config(str(ref["tmp"] / "plain.yaml"), ref["inputs"], plain_dir, precision="fp32", max_steps=1)
    run_command(["-m", "notellm2.launcher", "train", "--config", cfg, "eval.every_steps=0"], nproc=1, timeout=300)
    lora = load_config(cfg, [*LORA, "train.max_steps=2", "checkpoint.allow_config_mismatch=true"])
    with pytest.raises(UserError) as refused:  # the CLI prints a UserError as one line and exits 2
        ckpt.Checkpointer(lora, 0, 1).find_resume()  # before any model is built
    assert "step_00000001: holds no LoRA adapters" in str(refused.value) and "would start fresh" in str(refused.value)
    assert "\n" not in str(refused.value)
    # and the reverse: the LoRA run's checkpoint resumed by a full fine-tune
    full = load_config(ref["config"], ["checkpoint.allow_config_mismatch=true"])
    with pytest.raises(UserError, match="holds LoRA adapters .* this run trains the full LLM"):
        ckpt.Checkpointer(full, 0, 2).find_resume()
