"""The launcher's ZeRO-3 hook for growing the embedding (launcher/train/partitioning.py) and how
default_components loads the LLM. The 2-rank check that the grown matrix is partitioned before
deepspeed.initialize is tests/modeling/test_multirank_loss.py::test_loads_and_trains_under_zero3."""
from __future__ import annotations

import glob
import os

import pytest
import torch

from notellm2.launcher.config import load_config
from notellm2.launcher.train import partitioning
from notellm2.launcher.train.partitioning import embedding_grower
from notellm2.launcher.train.components import default_components
from notellm2.launcher.train.engine import build_ds_config
from tests.helpers.paths import REPO


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "ds_configs", "*.json"))))
def test_grower_only_under_zero3(path, monkeypatch):
    """Under ZeRO-3 the hook grows through grow_input_embeddings with the run's own DeepSpeed config
    (the model and row count passed on); under ZeRO-2 there is none (transformers resizes)."""
    ds = build_ds_config(load_config(None, [f"train.ds_config={path}"]), world_size=2)
    calls = []
    monkeypatch.setattr(partitioning, "grow_input_embeddings", lambda *a: calls.append(a))
    grower = embedding_grower(ds)
    assert (grower is not None) == (ds["zero_optimization"]["stage"] == 3)
    if grower is not None:
        model = torch.nn.Linear(1, 1)
        grower(model, 1234)
        assert len(calls) == 1 and calls[0][0] is model and calls[0][1] == 1234 and calls[0][2] is ds


class _Stop(Exception):
    pass


@pytest.mark.parametrize("ds_name,precision", [("zero3_bf16.json", "bf16"), ("cpu_zero3.json", "fp32"),
                                               ("zero2_bf16.json", "bf16")])
def test_default_components_loads_the_llm_for_the_engine(monkeypatch, ds_name, precision):
    """The LLM loads in the training dtype (flash-attn needs bf16) and, under ZeRO-3, with the grower."""
    import transformers.integrations
    import notellm2.modeling.backbone
    import notellm2.modeling.encoder  # noqa: F401  before the patch: imported under it, its own `load_llm` would stay the fake
    import notellm2.modeling.vision

    seen = {}

    def fake_load_llm(llm_cfg, **kwargs):
        seen.update(kwargs)
        raise _Stop

    # No live HfDeepSpeedConfig may outlive this test (it would turn ZeRO-3 on for later tests).
    monkeypatch.setattr(transformers.integrations, "HfDeepSpeedConfig", lambda ds: object())
    monkeypatch.setattr(notellm2.modeling.vision, "build_vision_tower", lambda *a, **k: None)
    monkeypatch.setattr(notellm2.modeling.backbone, "load_llm", fake_load_llm)
    cfg = load_config(None, [f"train.ds_config=ds_configs/{ds_name}", f"train.precision={precision}"])
    cfg.data.train_shards = ["pairs-train-000000.tar"]
    ds = build_ds_config(cfg, world_size=2)
    with pytest.raises(_Stop):
        default_components(cfg, 0, 2, ds)
    assert seen["dtype"] == (torch.bfloat16 if precision == "bf16" else None)
    assert (seen["grow_embeddings"] is not None) == (ds["zero_optimization"]["stage"] == 3)
