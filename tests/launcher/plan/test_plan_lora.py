"""`notellm2 plan` with `model.llm.lora`: the adapters counted on the meta model are the ones apply_lora builds;
gradients and optimizer states are those of the trainable parameters only (DeepSpeed's own estimator for
them, plus the frozen LLM weights' partition), the frozen weights stay in the parameters row."""
from __future__ import annotations

import json
import os

import pytest

from notellm2.launcher.config import load_config
from notellm2.launcher.plan import format_plan, make_plan
from tests.helpers import models as fixtures
from tests.helpers.paths import REPO

PAPER = os.path.join(REPO, "configs", "paper_scale.yaml")
LORA = ["model.llm.lora.enabled=true", "model.llm.lora.rank=16"]


def test_lora_counts_equal_the_parameters_apply_lora_builds(tmp_path):
    from notellm2.modeling.backbone import load_llm
    from notellm2.modeling.config import LoraConfig
    from notellm2.modeling.lora import apply_lora

    path = fixtures.make_tiny_llm_dir(tmp_path, arch="qwen2", num_layers=2, hidden=64)
    for extra in ([], ["model.llm.lora.trainable_modules=[norm]", "model.llm.lora.target_modules=[q_proj,v_proj]"]):
        cfg = load_config(None, [f"model.llm.path={path}", "model.variant=text_only", *LORA, *extra])
        lora = make_plan(cfg, nodes=1, gpus_per_node=1).llm.lora
        llm, tok = load_llm(cfg.model.llm)
        llm = apply_lora(llm, cfg.model.llm.lora, tok)
        trained = {n: p.numel() for n, p in llm.named_parameters() if p.requires_grad}
        assert lora.adapter_params == sum(v for n, v in trained.items() if ".lora_" in n)
        assert lora.placeholder_params == trained["embed_tokens.rows"] == 2 * 64
        assert lora.full_params == sum(v for n, v in trained.items() if n == "norm.weight")
        assert lora.trainable == sum(trained.values())
        assert lora.modules == len([n for n in trained if ".lora_A." in n])
    assert LoraConfig().rank == 8  # the default the docs quote


@pytest.mark.parametrize("gpus", [1, 8])
def test_lora_model_states_are_the_trainable_states_plus_the_frozen_partition(gpus):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    full = make_plan(load_config(PAPER), nodes=1, gpus_per_node=gpus)
    plan = make_plan(load_config(PAPER, LORA), nodes=1, gpus_per_node=gpus)
    lora = plan.llm.lora
    assert lora.modules == 28 * 7 and lora.placeholder_params == 2 * 3584
    assert plan.trainable_params == lora.trainable + plan.new.connector_params + plan.new.other_params
    assert plan.frozen_llm_params == plan.llm.params == full.llm.params
    assert plan.row("gradients").bytes == pytest.approx(4 * plan.trainable_params / gpus)
    assert plan.row("optimizer").bytes == pytest.approx(12 * plan.trainable_params / gpus)
    assert plan.row("parameters").bytes == pytest.approx(2 * (plan.trainable_params + plan.llm.params) / gpus)
    _, trainable_part, _ = estimate_zero3_model_states_mem_needs(
        plan.trainable_params, plan.largest_module, num_gpus_per_node=gpus, num_nodes=1, cpu_offload=False,
        cpu_offload_params=False, zero_init=True)
    assert plan.model_states() == pytest.approx(trainable_part + 2 * plan.frozen_llm_params / gpus, rel=1e-3)
    assert plan.model_states() < 0.35 * full.model_states()
    assert plan.deepspeed_model_states is None  # its estimator assumes every parameter trains


def test_lora_zero2_replicates_the_frozen_weights_and_partitions_the_rest():
    plan = make_plan(load_config(PAPER, [*LORA, "train.ds_config=ds_configs/zero2_bf16.json"]), nodes=1, gpus_per_node=8)
    assert plan.row("parameters").bytes == 2 * (plan.trainable_params + plan.llm.params)
    assert plan.row("gradients").bytes == pytest.approx(6 * plan.trainable_params / 8)


def test_lora_dropout_adds_the_dropped_inputs_to_the_activations():
    plain = make_plan(load_config(PAPER, LORA), nodes=1, gpus_per_node=8)
    drop = make_plan(load_config(PAPER, [*LORA, "model.llm.lora.dropout=0.05"]), nodes=1, gpus_per_node=8)
    tokens = plain.notes_per_micro_batch * plain.seq_len
    layer_share = tokens * 2 * plain.llm.lora.adapter_inputs * 2 / plain.llm.layers  # bf16, checkpointing on
    assert drop.row("lora_activations").bytes - plain.row("lora_activations").bytes == pytest.approx(layer_share)


def test_lora_plan_text_and_json(capsys):
    from notellm2.launcher.cli import main

    plan = make_plan(load_config(PAPER, LORA), nodes=1, gpus_per_node=8)
    text = format_plan(plan, gpu_memory_gib=80)
    assert "| LLM (qwen2, 28 layers, width 3584) | 7.07 B | frozen, ZeRO-3 |" in text
    assert "LoRA adapters (rank 16 on 196 linear modules) + placeholder rows" in text
    assert main(["plan", "--config", PAPER, "--json", *LORA]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["params"]["lora"]["rank"] == 16 and data["params"]["llm_frozen"] == plan.llm.params
    assert data["params"]["trainable"] == plan.trainable_params
